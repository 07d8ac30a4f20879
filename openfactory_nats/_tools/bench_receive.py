"""Receive throughput and latency, side by side with a nats-py asyncio callback.

A publisher in another process (plain nats-py) sends the messages; the receiving paths
run here, one after the other in alternating rounds, against the same server. The rate
is counted from the first message received to the last, and every message must arrive.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import nats

from .._blocking.facade import SyncNatsCluster
from .._message import Msg

__all__ = ("receive_benchmark",)

_log = logging.getLogger("openfactory_nats.bench")
_SUBJECT = "bench.receive"
_UNBOUNDED = 1 << 40  # the receive benchmark keeps everything: it measures speed, not limits


def _publisher(url: str, count: int, size: int, rate: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "openfactory_nats._tools.bench_receive",
            "--publisher",
            url,
            str(count),
            str(size),
            str(rate),
        ],
        stdin=subprocess.PIPE,
        text=True,
    )


def _run_publisher(url: str, count: int, size: int, rate: float) -> None:
    """Publish *count* messages once told to on stdin; with *rate*, paced, each carrying
    ``time.monotonic_ns()`` (a clock shared by the processes of a host)."""

    async def main() -> None:
        nc = await nats.connect(url)
        sys.stdin.readline()
        payload = b"x" * size
        started = time.perf_counter()
        for i in range(count):
            if rate:
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await nc.publish(_SUBJECT, b"%d" % time.monotonic_ns())
            else:
                await nc.publish(_SUBJECT, payload)
        await nc.flush(timeout=60)
        await nc.close()

    asyncio.run(main())


class _Counter:
    """Counts arrivals; records the time of the first and of the last."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = 0
        self.first = 0.0
        self.last = 0.0
        self.done = threading.Event()

    def tick(self) -> None:
        if not self.seen:
            self.first = time.perf_counter()
        self.seen += 1
        if self.seen == self.count:
            self.last = time.perf_counter()
            self.done.set()

    def rate(self, name: str, timeout: float) -> float:
        if not self.done.wait(timeout):
            raise RuntimeError(f"{name}: received {self.seen} of {self.count} messages")
        return (self.count - 1) / max(self.last - self.first, 1e-9)


def _plain_callback(url: str, count: int, size: int) -> float:
    counter = _Counter(count)

    async def main() -> None:
        nc = await nats.connect(url)

        async def on_msg(msg: Any) -> None:
            counter.tick()

        await nc.subscribe(_SUBJECT, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.flush()
        publisher = _publisher(url, count, size, 0)
        assert publisher.stdin is not None
        publisher.stdin.write("go\n")
        publisher.stdin.flush()
        await asyncio.to_thread(counter.done.wait, 120)
        publisher.wait(60)
        await nc.close()

    asyncio.run(main())
    return counter.rate("nats-py callback", 0)


def _facade(url: str, count: int, size: int, mode: str) -> float:
    counter = _Counter(count)
    with SyncNatsCluster("bench", [url], _log, timeout=60) as cluster:
        if mode == "callback":
            cluster.subscribe(
                _SUBJECT, lambda msg: counter.tick(), max_pending_msgs=_UNBOUNDED, max_pending_bytes=_UNBOUNDED
            )
            reader = None
        else:
            sub = cluster.subscribe(_SUBJECT, max_pending_msgs=_UNBOUNDED, max_pending_bytes=_UNBOUNDED)

            def read() -> None:
                for _ in sub:
                    counter.tick()
                    if counter.done.is_set():
                        return

            reader = threading.Thread(target=read)
            reader.start()
        publisher = _publisher(url, count, size, 0)
        assert publisher.stdin is not None
        publisher.stdin.write("go\n")
        publisher.stdin.flush()
        rate = counter.rate(f"facade {mode}", 120)
        publisher.wait(60)
    if reader is not None:
        reader.join(10)
    return rate


def _latency(url: str, seconds: float, rate: int) -> dict[str, float]:
    """Publisher paced at *rate* msgs/s in another process, to a callback here."""
    count = int(seconds * rate)
    delays: list[int] = []
    done = threading.Event()

    def on_msg(msg: Msg) -> None:
        delays.append(time.monotonic_ns() - int(msg.data))
        if len(delays) == count:
            done.set()

    with SyncNatsCluster("latency", [url], _log) as cluster:
        cluster.subscribe(_SUBJECT, on_msg)
        publisher = _publisher(url, count, 0, rate)
        assert publisher.stdin is not None
        publisher.stdin.write("go\n")
        publisher.stdin.flush()
        done.wait(seconds + 30)
        publisher.wait(30)
    ordered = sorted(delays)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] / 1e6 if ordered else float("nan")

    return {"received": len(ordered), "expected": count, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "rate": rate}


def receive_benchmark(
    url: str, count: int, size: int, rounds: int, latency_seconds: float, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Median receive rates of each path (and ratios to the nats-py callback), plus the
    publish-to-callback latency at 10,000 msgs/s."""
    paths: list[tuple[str, Callable[[], float]]] = [
        ("plain_callback", lambda: _plain_callback(url, count, size)),
        ("facade_callback", lambda: _facade(url, count, size, "callback")),
        ("facade_iterator", lambda: _facade(url, count, size, "iterator")),
    ]
    runs: dict[str, list[float]] = {name: [] for name, _ in paths}
    for round_no in range(rounds):
        for name, measure in paths if round_no % 2 == 0 else list(reversed(paths)):
            rate = measure()
            runs[name].append(rate)
            progress(f"receive {size} B  round {round_no + 1}  {name:<16} {rate:>12,.0f} msgs/s")
    plain = statistics.median(runs["plain_callback"])
    result: dict[str, Any] = {"size": size, "messages": count, "plain_callback": plain}
    for name in ("facade_callback", "facade_iterator"):
        result[name] = statistics.median(runs[name])
        result[f"{name}_ratio"] = result[name] / plain
    if latency_seconds > 0:
        progress(f"receive latency: 10000 msgs/s for {latency_seconds:g} s")
        result["latency"] = _latency(url, latency_seconds, 10_000)
    return result


def format_receive(result: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"receive {result['size']} B x {result['messages']}: nats-py async callback {result['plain_callback']:,.0f}  "
        f"facade callback {result['facade_callback']:,.0f} ({result['facade_callback_ratio']:.2f}x)  "
        f"facade iterator {result['facade_iterator']:,.0f} ({result['facade_iterator_ratio']:.2f}x)",
    ]
    lat = result.get("latency")
    if lat:
        lines.append(
            f"publish-to-callback latency at {lat['rate']} msgs/s ({lat['received']}/{lat['expected']} msgs): "
            f"p50 {lat['p50_ms']:.3f} ms  p99 {lat['p99_ms']:.3f} ms"
        )
    return lines


if __name__ == "__main__":  # the publisher process
    if sys.argv[1:2] != ["--publisher"]:
        raise SystemExit("use `openfactory-nats bench`")
    _run_publisher(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
