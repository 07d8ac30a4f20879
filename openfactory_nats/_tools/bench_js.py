"""The JetStream part of the benchmark: consuming a file stream with one ack per message.

Three consumers of the same stream of 128-byte messages, each on a fresh durable consumer,
alternated over the rounds: nats-py's async pull consumer (``fetch(100)`` then ``await
msg.ack()`` for each), this library's ``sub.fetch(100)`` from one thread with ``msg.ack()``
for each, and ``js.consume(workers=4)`` with an empty handler, by default (each worker
fetches its own message) and with ``prefetch=100``. Each run ends when every
message was handled and the acks reached the server (a flush).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import nats

from .._blocking.facade import SyncNatsCluster
from .embedded import EmbeddedServer

__all__ = ("format_jetstream", "jetstream_benchmark")

_log = logging.getLogger("openfactory_nats.bench")
_STREAM = "BENCH"
_SUBJECT = "bench.js"
_PREFETCH = 100


def _fill(url: str, count: int, size: int) -> None:
    with SyncNatsCluster("bench-js", url, _log) as nats_:
        js = nats_.jetstream()
        js.add_stream(_STREAM, [_SUBJECT], "file")
        payload = b"x" * size
        for _ in range(count):
            nats_.publish(_SUBJECT, payload)
        nats_.flush()
        deadline = time.monotonic() + 60
        while js.stream_info(_STREAM).messages < count:
            if time.monotonic() > deadline:
                raise RuntimeError("the stream did not store every message within 60 s")
            time.sleep(0.05)


def _plain(url: str, count: int, durable: str) -> float:
    async def main() -> float:
        nc = await nats.connect(url)
        try:
            sub = await nc.jetstream().pull_subscribe(_SUBJECT, durable=durable, stream=_STREAM)
            start = time.perf_counter()
            done = 0
            while done < count:
                msgs = await sub.fetch(100, timeout=10)
                for msg in msgs:
                    await msg.ack()
                done += len(msgs)
            await nc.flush()
            return count / (time.perf_counter() - start)
        finally:
            await nc.close()

    return asyncio.run(main())


def _fetch(url: str, count: int, durable: str) -> float:
    with SyncNatsCluster("bench-js", url, _log) as nats_:
        sub = nats_.jetstream().pull_subscribe(_SUBJECT, durable, _STREAM)
        start = time.perf_counter()
        done = 0
        while done < count:
            msgs = sub.fetch(100, timeout=10)
            for msg in msgs:
                msg.ack()
            done += len(msgs)
        nats_.flush()
        return count / (time.perf_counter() - start)


def _consume(url: str, count: int, durable: str, prefetch: int = 0) -> float:
    with SyncNatsCluster("bench-js", url, _log) as nats_:
        all_done = threading.Event()
        lock = threading.Lock()
        handled = [0]

        def handler(_msg: object) -> None:
            with lock:
                handled[0] += 1
                if handled[0] >= count:
                    all_done.set()

        js = nats_.jetstream()
        js.pull_subscribe(_SUBJECT, durable, _STREAM).unsubscribe()  # the consumer exists before the clock runs
        start = time.perf_counter()
        pool = js.consume(_SUBJECT, handler, durable, _STREAM, workers=4, prefetch=prefetch)
        if not all_done.wait(600):
            raise RuntimeError(f"consume(workers=4) handled {handled[0]} of {count} messages in 600 s")
        while pool.processed < count:  # the last handlers' acks are queued after they return
            time.sleep(0.001)
        nats_.flush()
        rate = count / (time.perf_counter() - start)
        pool.stop()  # not timed: it waits up to a second for the fetches in progress
        return rate


def _consume_prefetch(url: str, count: int, durable: str) -> float:
    return _consume(url, count, durable, prefetch=_PREFETCH)


def jetstream_benchmark(
    messages: int, rounds: int, progress: Callable[[str], None] = lambda _: None, size: int = 128
) -> dict[str, Any]:
    """Run the three consumers *rounds* times on an embedded JetStream server; medians."""
    store = tempfile.mkdtemp(prefix="bench-js-")
    server = EmbeddedServer("bench-js", ["-js", "-sd", store]).start()
    try:
        progress(f"jetstream: storing {messages} messages of {size} B in a file stream")
        _fill(server.url, messages, size)
        paths: list[tuple[str, Callable[[str, int, str], float]]] = [
            ("plain", _plain),
            ("fetch_1", _fetch),
            ("consume_4", _consume),
            ("consume_4_prefetch", _consume_prefetch),
        ]
        runs: dict[str, list[float]] = {name: [] for name, _ in paths}
        for round_no in range(rounds):
            for name, measure in paths if round_no % 2 == 0 else list(reversed(paths)):
                rate = measure(server.url, messages, f"{name}-{round_no}")
                runs[name].append(rate)
                progress(f"jetstream round {round_no + 1}  {name:<9} {rate:>12,.0f} msgs/s")
        plain = statistics.median(runs["plain"])
        result: dict[str, Any] = {"messages": messages, "size": size, "rounds": rounds, "plain": plain}
        for name in ("fetch_1", "consume_4", "consume_4_prefetch"):
            result[name] = statistics.median(runs[name])
            result[f"{name}_ratio"] = result[name] / plain
        return result
    finally:
        server.close()
        shutil.rmtree(store, ignore_errors=True)


def format_jetstream(r: dict[str, Any]) -> list[str]:
    """The table section of :func:`jetstream_benchmark`'s result."""
    return [
        "",
        f"jetstream: {r['messages']:,} x {r['size']} B from a file stream, fetch(100), one ack per message (msgs/s)",
        f"  nats-py async pull consumer {r['plain']:>10,.0f}",
        f"  sub.fetch, 1 thread         {r['fetch_1']:>10,.0f} ({r['fetch_1_ratio']:.2f}x)",
        f"  consume(workers=4)          {r['consume_4']:>10,.0f} ({r['consume_4_ratio']:.2f}x)"
        "  each worker fetches its own message",
        f"  consume(workers=4, prefetch={_PREFETCH})"
        f" {r['consume_4_prefetch']:>6,.0f} ({r['consume_4_prefetch_ratio']:.2f}x)",
    ]
