"""The key-value part of the benchmark, next to nats-py's async KV on the same server.

* ``get``: latency of one key read from one thread (p50/p99), against ``await kv.get``.
* ``put``: puts/s from 8 threads, against 8 asyncio tasks each awaiting its ``put``.
* ``watch``: a bucket of N keys (one revision each) delivered to a watch from its start to
  the last one: a callback counting entries, against nats-py's async watcher iterated.
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
from .._jetstream.kv import Entry
from .embedded import EmbeddedServer

__all__ = ("format_kv", "kv_benchmark")

_log = logging.getLogger("openfactory_nats.bench")
_WRITERS = 8


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _plain_get(url: str, gets: int) -> list[float]:
    async def main() -> list[float]:
        nc = await nats.connect(url)
        try:
            kv = await nc.jetstream().key_value("GETS")
            times = []
            for _ in range(gets):
                start = time.perf_counter()
                await kv.get("k")
                times.append(time.perf_counter() - start)
            return times
        finally:
            await nc.close()

    return asyncio.run(main())


def _get(url: str, gets: int) -> list[float]:
    with SyncNatsCluster("bench-kv", url, _log) as c:
        kv = c.jetstream().key_value("GETS")
        kv.get("k")
        times = []
        for _ in range(gets):
            start = time.perf_counter()
            kv.get("k")
            times.append(time.perf_counter() - start)
        return times


def _plain_put(url: str, puts: int) -> float:
    async def main() -> float:
        nc = await nats.connect(url)
        try:
            kv = await nc.jetstream().key_value("PUTS")
            each = puts // _WRITERS

            async def task(t: int) -> None:
                for i in range(each):
                    await kv.put(f"t{t}.{i % 100}", b"x" * 128)

            start = time.perf_counter()
            await asyncio.gather(*(task(t) for t in range(_WRITERS)))
            return each * _WRITERS / (time.perf_counter() - start)
        finally:
            await nc.close()

    return asyncio.run(main())


def _put(url: str, puts: int) -> float:
    with SyncNatsCluster("bench-kv", url, _log) as c:
        kv = c.jetstream().key_value("PUTS")
        each = puts // _WRITERS

        def writer(t: int) -> None:
            for i in range(each):
                kv.put(f"t{t}.{i % 100}", b"x" * 128)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(_WRITERS)]
        start = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return each * _WRITERS / (time.perf_counter() - start)


def _plain_watch(url: str, count: int) -> float:
    async def main() -> float:
        nc = await nats.connect(url)
        try:
            kv = await nc.jetstream().key_value("WATCH")
            start = time.perf_counter()
            w = await kv.watchall()
            got = 0
            async for entry in w:
                if entry is not None:
                    got += 1
                    if got == count:
                        break
            rate = count / (time.perf_counter() - start)
            await w.stop()  # type: ignore[no-untyped-call]
            return rate
        finally:
            await nc.close()

    return asyncio.run(main())


def _watch(url: str, count: int) -> float:
    with SyncNatsCluster("bench-kv", url, _log) as c:
        kv = c.jetstream().key_value("WATCH")
        done = threading.Event()
        got = [0]

        def on_entry(_e: Entry) -> None:
            got[0] += 1
            if got[0] == count:
                done.set()

        start = time.perf_counter()
        w = kv.watch(">", on_entry)
        if not done.wait(600):
            raise RuntimeError(f"the watch delivered {got[0]} of {count} entries in 600 s")
        rate = count / (time.perf_counter() - start)
        w.stop()
        return rate


def _fill(url: str, count: int) -> None:
    with SyncNatsCluster("bench-kv", url, _log) as c:
        js = c.jetstream()
        js.create_key_value("GETS", storage="memory").put("k", b"x" * 128)
        js.create_key_value("PUTS", storage="memory")
        js.create_key_value("WATCH", storage="memory")
        for i in range(count):  # plain publishes: the stream stores them all the same
            c.publish(f"$KV.WATCH.k{i}", b"x" * 128)
        c.flush()
        deadline = time.monotonic() + 120
        while js.stream_info("KV_WATCH").messages < count:
            if time.monotonic() > deadline:
                raise RuntimeError("the bucket did not store every update within 120 s")
            time.sleep(0.05)


def kv_benchmark(updates: int, rounds: int, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run the three measurements *rounds* times on an embedded JetStream server; medians."""
    store = tempfile.mkdtemp(prefix="bench-kv-")
    server = EmbeddedServer("bench-kv", ["-js", "-sd", store]).start()
    gets = max(100, min(updates, 5000))
    puts = max(_WRITERS * 10, min(updates, 40_000))
    try:
        progress(f"kv: storing {updates} keys")
        _fill(server.url, updates)
        runs: dict[str, list[Any]] = {k: [] for k in ("plain_get", "get", "plain_put", "put", "plain_watch", "watch")}
        for round_no in range(rounds):
            pairs: list[tuple[str, Callable[[str, int], Any], int]] = [
                ("plain_get", _plain_get, gets),
                ("get", _get, gets),
                ("plain_put", _plain_put, puts),
                ("put", _put, puts),
                ("plain_watch", _plain_watch, updates),
                ("watch", _watch, updates),
            ]
            for name, measure, n in pairs if round_no % 2 == 0 else list(reversed(pairs)):
                runs[name].append(measure(server.url, n))
            progress(f"kv round {round_no + 1} done")
        r: dict[str, Any] = {"updates": updates, "gets": gets, "puts": puts, "rounds": rounds}
        for name in ("plain_get", "get"):
            r[f"{name}_p50_ms"] = statistics.median(_pct(t, 0.5) for t in runs[name]) * 1e3
            r[f"{name}_p99_ms"] = statistics.median(_pct(t, 0.99) for t in runs[name]) * 1e3
        for name in ("plain_put", "put", "plain_watch", "watch"):
            r[name] = statistics.median(runs[name])
        r["get_p50_ratio"] = r["get_p50_ms"] / r["plain_get_p50_ms"]
        r["put_ratio"] = r["put"] / r["plain_put"]
        r["watch_ratio"] = r["watch"] / r["plain_watch"]
        return r
    finally:
        server.close()
        shutil.rmtree(store, ignore_errors=True)


def format_kv(r: dict[str, Any]) -> list[str]:
    """The table section of :func:`kv_benchmark`'s result."""
    return [
        "",
        f"key-value: get of one key ({r['gets']:,} times), put from 8 writers ({r['puts']:,}), watch of "
        f"{r['updates']:,} keys",
        f"  get p50/p99, nats-py async  {r['plain_get_p50_ms']:.3f} / {r['plain_get_p99_ms']:.3f} ms",
        f"  get p50/p99, 1 thread       {r['get_p50_ms']:.3f} / {r['get_p99_ms']:.3f} ms"
        f" ({r['get_p50_ratio']:.2f}x nats-py's p50)",
        f"  put, 8 asyncio tasks        {r['plain_put']:>10,.0f} /s",
        f"  put, 8 threads              {r['put']:>10,.0f} /s ({r['put_ratio']:.2f}x)",
        f"  watch, nats-py async        {r['plain_watch']:>10,.0f} entries/s",
        f"  watch, callback thread      {r['watch']:>10,.0f} entries/s ({r['watch_ratio']:.2f}x)",
    ]
