"""The demo: threads publish asset messages while an independent subscriber checks them."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import nats

from ._sync import SyncNatsCluster

__all__ = ("DemoResult", "run_demo")

_log = logging.getLogger("openfactory_nats.demo")
DATA_ITEMS = ("Availability", "Execution", "SpindleSpeed", "Temperature")


@dataclass
class DemoResult:
    """What the subscriber saw."""

    expected: int
    delivered: int
    in_order: bool
    duplicates: int
    seconds: float
    latencies_ms: list[float]

    @property
    def ok(self) -> bool:
        return self.delivered == self.expected and self.in_order and not self.duplicates

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")

    def summary(self) -> str:
        rate = self.expected / self.seconds if self.seconds else 0.0
        verdict = "OK" if self.ok else "FAILED"
        return "\n".join(
            [
                f"messages   {self.expected} published from threads in {self.seconds:.2f} s ({rate:,.0f} msgs/s)",
                f"latency    p50 {self.percentile(0.5):.3f} ms  p99 {self.percentile(0.99):.3f} ms  "
                f"p99.9 {self.percentile(0.999):.3f} ms",
                f"delivered  {self.delivered} of {self.expected}, per-thread order "
                f"{'kept' if self.in_order else 'BROKEN'}, {self.duplicates} duplicates: {verdict}",
            ]
        )


class _Checker:
    """A plain nats-py subscriber on its own thread and loop, independent of the library."""

    def __init__(self, url: str, subject: str) -> None:
        self.count = 0
        self.in_order = True
        self.duplicates = 0
        self.latencies_ms: list[float] = []
        self._last: dict[int, int] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="demo-subscriber", daemon=True)
        self._thread.start()
        self._nc: Any = asyncio.run_coroutine_threadsafe(self._start(url, subject), self._loop).result(15)

    async def _start(self, url: str, subject: str) -> Any:
        async def on_msg(msg: Any) -> None:
            now = time.monotonic_ns()
            body = json.loads(msg.data)
            thread, seq = body["thread"], body["seq"]
            last = self._last.get(thread, -1)
            if seq <= last:
                self.duplicates += 1
            elif seq != last + 1:
                self.in_order = False
            self._last[thread] = max(seq, last)
            self.latencies_ms.append((now - body["ts"]) / 1e6)
            self.count += 1

        async def quiet(_: Exception) -> None:
            pass

        nc = await nats.connect(url, error_cb=quiet, connect_timeout=5, max_reconnect_attempts=3)
        await nc.subscribe(subject, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.flush()
        return nc

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()


def run_demo(
    servers: list[str],
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

    *rate* is the total pace in msgs/s (0: as fast as possible, which measures queueing
    more than latency).

    Subjects are ``demo.<run>.<asset-uuid>.<data item>`` and payloads JSON, as asset
    forwarders send them.
    """
    run = uuid.uuid4().hex[:8]
    asset_ids = [str(uuid.uuid4()) for _ in range(assets)]
    checker = _Checker(servers[0], f"demo.{run}.>")
    expected = threads * messages
    try:
        with SyncNatsCluster("demo", servers, _log, timeout=timeout, **(options or {})) as cluster:
            cluster.connect()
            published = [0] * threads

            interval = threads / rate if rate > 0 else 0.0

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
                    cluster.publish(f"demo.{run}.{asset}.{item}", json.dumps(body).encode())
                    published[t] += 1

            workers = [threading.Thread(target=work, args=(t,), name=f"demo-publisher-{t}") for t in range(threads)]
            started = time.perf_counter()
            for worker in workers:
                worker.start()
            _watch(workers, lambda: (sum(published), checker.count), expected, progress)
            cluster.flush(timeout)
            seconds = time.perf_counter() - started
        deadline = time.monotonic() + timeout
        while checker.count < expected and time.monotonic() < deadline:
            time.sleep(0.02)
        _report(progress, sum(published), checker.count, expected, final=True)
    finally:
        checker.close()
    return DemoResult(expected, checker.count, checker.in_order, checker.duplicates, seconds, checker.latencies_ms)


def _watch(
    workers: list[threading.Thread], counts: Callable[[], tuple[int, int]], expected: int, out: TextIO | None
) -> None:
    while any(w.is_alive() for w in workers):
        for w in workers:
            w.join(0.25)
            break
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `openfactory-nats demo`")
