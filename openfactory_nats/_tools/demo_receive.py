"""The demo's receive section: subscriptions with callbacks on a shared dispatcher, and
the blocking iterator, each checked for completeness and order."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from .._blocking.facade import SyncNatsCluster
from .._message import Msg

__all__ = ("run_receive_demo",)

_log = logging.getLogger("openfactory_nats.demo")


def run_receive_demo(
    urls: list[str],
    *,
    assets: int = 20,
    messages: int = 250,
    timeout: float = 10.0,
    options: dict[str, Any] | None = None,
) -> tuple[bool, str]:
    """Publish *messages* per asset; one callback subscription per asset (sharing a
    4-thread dispatcher) and one iterator over all of them must each get everything, in
    order. Returns whether both did, and the lines to print."""
    run = uuid.uuid4().hex[:8]
    ids = [str(uuid.uuid4()) for _ in range(assets)]
    expected = assets * messages
    got: dict[str, list[int]] = {asset: [] for asset in ids}
    lock = threading.Lock()
    done = threading.Event()
    count = [0]

    def callback_for(asset: str) -> Any:
        def on_message(msg: Msg) -> None:
            with lock:
                got[asset].append(int(msg.data))
                count[0] += 1
                if count[0] == expected:
                    done.set()

        return on_message

    with SyncNatsCluster("demo-receive", urls, _log, timeout=timeout, **(options or {})) as nats:
        dispatcher = nats.dispatcher(threads=4)
        for asset in ids:
            nats.subscribe(f"demo.{run}.{asset}.*", callback_for(asset), dispatcher=dispatcher)
        everything = nats.subscribe(f"demo.{run}.>")
        pulled: list[tuple[str, int]] = []

        def read() -> None:
            for msg in everything:  # ends when the subscription is unsubscribed
                pulled.append((msg.subject, int(msg.data)))
                if len(pulled) == expected:
                    return

        reader = threading.Thread(target=read, name="demo-iterator")
        reader.start()
        started = time.perf_counter()
        for seq in range(messages):
            for asset in ids:
                nats.publish(f"demo.{run}.{asset}.Temperature", b"%d" % seq)
        nats.flush()
        done.wait(timeout)
        reader.join(timeout)
        seconds = time.perf_counter() - started
        everything.unsubscribe()
        reader.join(timeout)
    delivered = sum(len(v) for v in got.values())
    ordered = all(v == sorted(v) for v in got.values())
    by_asset = {asset: [seq for subject, seq in pulled if subject.split(".")[2] == asset] for asset in ids}
    pulled_ordered = all(v == list(range(messages)) for v in by_asset.values())
    ok_cb = delivered == expected and ordered
    ok_it = len(pulled) == expected and pulled_ordered
    lines = [
        "== receive",
        f"callbacks  {delivered} of {expected} to {assets} subscriptions on a 4-thread dispatcher in {seconds:.2f} s, "
        f"per-asset order {'kept' if ordered else 'BROKEN'}: {'OK' if ok_cb else 'FAILED'}",
        f"iterator   {len(pulled)} of {expected} through `for msg in sub`, per-asset order "
        f"{'kept' if pulled_ordered else 'BROKEN'}: {'OK' if ok_it else 'FAILED'}",
    ]
    return ok_cb and ok_it, "\n".join(lines)
