"""The demo: threads publish asset messages while independent subscribers check them."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import nats

from .._blocking.facade import SyncNatsCluster
from .._routing.ring import HashRing
from .._routing.router import SyncClusterRouter

__all__ = ("DemoResult", "run_demo")

_log = logging.getLogger("openfactory_nats.demo")
DATA_ITEMS = ("Availability", "Execution", "SpindleSpeed", "Temperature")


@dataclass
class DemoResult:
    """What the subscribers saw."""

    title: str
    expected: int
    delivered: int = 0
    in_order: bool = True
    duplicates: int = 0
    misrouted: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.delivered == self.expected and self.in_order and not self.duplicates and not self.misrouted

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")

    def summary(self) -> str:
        rate = self.expected / self.seconds if self.seconds else 0.0
        verdict = "OK" if self.ok else "FAILED"
        return "\n".join(
            [
                f"== {self.title}",
                f"messages   {self.expected} published from threads in {self.seconds:.2f} s ({rate:,.0f} msgs/s)",
                f"latency    p50 {self.percentile(0.5):.3f} ms  p99 {self.percentile(0.99):.3f} ms  "
                f"p99.9 {self.percentile(0.999):.3f} ms (subscribers in this process)",
                f"delivered  {self.delivered} of {self.expected}, per-thread order "
                f"{'kept' if self.in_order else 'BROKEN'}, {self.duplicates} duplicates, "
                f"{self.misrouted} on the wrong cluster: {verdict}",
            ]
        )


class _Checker:
    """A plain nats-py subscriber on its own thread and loop, independent of the library.

    It checks that each publishing thread's messages arrive in order, once, and (with a
    ring) only at the cluster that owns their asset.
    """

    def __init__(self, url: str, subject: str, owner: str | None = None, ring: HashRing | None = None) -> None:
        self.count = 0
        self.in_order = True
        self.duplicates = 0
        self.misrouted = 0
        self.latencies_ms: list[float] = []
        self._owner = owner
        self._ring = ring
        self._last: dict[int, int] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="demo-subscriber", daemon=True)
        self._thread.start()
        try:
            self._nc: Any = asyncio.run_coroutine_threadsafe(self._start(url, subject), self._loop).result(15)
        except BaseException:
            self._stop_loop()
            raise

    async def _start(self, url: str, subject: str) -> Any:
        async def on_msg(msg: Any) -> None:
            now = time.monotonic_ns()
            body = json.loads(msg.data)
            thread, seq = body["thread"], body["seq"]
            last = self._last.get(thread, -1)
            if seq == last:
                self.duplicates += 1
            elif seq < last:
                self.in_order = False
            self._last[thread] = max(seq, last)
            if self._ring is not None and self._ring.get(body["asset"]) != self._owner:
                self.misrouted += 1
            self.latencies_ms.append((now - body["ts"]) / 1e6)
            self.count += 1

        async def quiet(_: Exception) -> None:
            pass

        nc = await nats.connect(url, error_cb=quiet, connect_timeout=5, max_reconnect_attempts=3)
        await nc.subscribe(subject, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.flush()
        return nc

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(5)
        finally:
            self._stop_loop()


def run_demo(
    clusters: Mapping[str, list[str]],
    *,
    threads: int = 4,
    messages: int = 2500,
    assets: int = 20,
    timeout: float = 10.0,
    rate: float = 20_000.0,
    options: dict[str, Any] | None = None,
    progress: TextIO | None = None,
) -> DemoResult:
    """Publish ``threads * messages`` asset messages and check that all of them arrive.

    One cluster is published to through :class:`SyncNatsCluster`; several through
    :class:`SyncClusterRouter`, each asset to the cluster that owns it. Subjects are
    ``demo.<run>.<asset-uuid>.<data item>`` and payloads JSON, as asset forwarders send
    them. *rate* is the total pace in msgs/s (0: as fast as possible, which measures
    queueing more than latency).
    """
    run = uuid.uuid4().hex[:8]
    asset_ids = [str(uuid.uuid4()) for _ in range(assets)]
    expected = threads * messages
    routed = len(clusters) > 1
    title = f"router over {len(clusters)} clusters" if routed else "one cluster"
    result = DemoResult(title, expected)
    client: SyncNatsCluster | SyncClusterRouter
    if routed:
        client = SyncClusterRouter(clusters, _log, timeout=timeout, **(options or {}))
        ring: HashRing | None = client.ring
    else:
        ((name, urls),) = clusters.items()
        client = SyncNatsCluster(name, urls, _log, timeout=timeout, **(options or {}))
        ring = None
    checkers: list[_Checker] = []
    try:
        for name, urls in clusters.items():
            checkers.append(_Checker(urls[0], f"demo.{run}.>", name, ring))
        client.connect()
        published = [0] * threads
        interval = threads / rate if rate > 0 else 0.0

        def send(asset: str, subject: str, body: bytes) -> None:
            if isinstance(client, SyncClusterRouter):
                client.publish(asset, subject, body)
            else:
                client.publish(subject, body)

        def work(t: int) -> None:
            start = time.perf_counter()
            for seq in range(messages):
                if interval:
                    delay = start + seq * interval - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                asset = asset_ids[(t * messages + seq) % assets]
                item = DATA_ITEMS[seq % len(DATA_ITEMS)]
                body = {"asset": asset, "id": item, "thread": t, "seq": seq, "ts": time.monotonic_ns()}
                send(asset, f"demo.{run}.{asset}.{item}", json.dumps(body).encode())
                published[t] += 1

        workers = [threading.Thread(target=work, args=(t,), name=f"demo-publisher-{t}") for t in range(threads)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()

        def delivered() -> int:
            return sum(c.count for c in checkers)

        _watch(workers, lambda: (sum(published), delivered()), expected, progress)
        client.flush(timeout)
        result.seconds = time.perf_counter() - started
        deadline = time.monotonic() + timeout
        while delivered() < expected and time.monotonic() < deadline:
            time.sleep(0.02)
        _report(progress, sum(published), delivered(), expected, final=True)
    finally:
        client.close()
        for checker in checkers:
            checker.close()
    result.delivered = sum(c.count for c in checkers)
    result.in_order = all(c.in_order for c in checkers)
    result.duplicates = sum(c.duplicates for c in checkers)
    result.misrouted = sum(c.misrouted for c in checkers)
    result.latencies_ms = [x for c in checkers for x in c.latencies_ms]
    return result


def _watch(
    workers: list[threading.Thread], counts: Callable[[], tuple[int, int]], expected: int, out: TextIO | None
) -> None:
    while any(w.is_alive() for w in workers):
        next(w for w in workers if w.is_alive()).join(0.25)
        _report(out, *counts(), expected)


def _report(out: TextIO | None, published: int, delivered: int, expected: int, final: bool = False) -> None:
    if out is None:
        return
    line = f"published {published}/{expected}  delivered {delivered}/{expected}"
    if out.isatty():
        out.write("\r" + line + ("\n" if final else ""))
    elif final:
        out.write(line + "\n")
    out.flush()
