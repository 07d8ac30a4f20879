"""Request/reply round trips and rates, side by side with nats-py asyncio.

Three measurements, each against plain nats-py in the same run and server, rounds
alternating between the paths, medians quoted:

* ``sequential``: one thread sends requests one after the other (``SyncNatsCluster.request``
  against ``await nc.request(...)`` under ``asyncio.run``); p50 and p99 round trip.
* ``threads``: 8 threads requesting at once against 8 concurrent asyncio tasks; requests/s.
  Where the platform allows it, measured again with the measuring process's threads on
  one CPU (both paths alike), beside the cost of a thread hand-off on this machine:
  8 blocked threads need a wake-up each per round of requests, and where waking a
  thread on another CPU is slow (virtual machines) that, not the library's code, bounds
  the rate.
* ``serve``: ``serve(workers=4)`` against a nats-py async responder (both in this
  process); the same nats-py requester in another process (8 concurrent tasks) counts
  the answered requests per second.

The responder of the first two is a nats-py asyncio echo responder in another process,
the same one for both paths, so that only the requesting side differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import nats

from .._blocking.facade import SyncNatsCluster
from .._message import Msg

__all__ = ("format_requests", "requests_benchmark")

_log = logging.getLogger("openfactory_nats.bench")
_ECHO = "bench.request.echo"
_SERVE = "bench.request.serve"
_THREADS = 8
_WORKERS = 4
_TIMEOUT = 30.0


def _helper(*args: object) -> subprocess.Popen[str]:
    """A helper process (see :func:`_helper_main`), once it printed ``ready``."""
    child = subprocess.Popen(
        [sys.executable, "-m", "openfactory_nats._tools.bench_requests", *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        child.kill()
        child.wait(5)
        raise RuntimeError(f"the request benchmark's {args[0]} process did not start")
    return child


def _stop(child: subprocess.Popen[str]) -> str:
    """Close the helper's stdin (its signal to finish) and return what it printed."""
    try:
        out, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
    return out


def _percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    if not ordered:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return {"p50_ms": pct(0.5), "p99_ms": pct(0.99)}


def _check(name: str, reply: bytes, payload: bytes) -> None:
    if reply != payload:
        raise RuntimeError(f"{name}: a reply did not echo its request")


# -- sequential requests from one thread, and 8 threads at once ---------------------------
def _plain_sequential(url: str, count: int, payload: bytes) -> dict[str, float]:
    async def main() -> list[float]:
        nc = await nats.connect(url)
        for _ in range(20):  # warm up: nats-py subscribes its reply inbox on the first request
            await nc.request(_ECHO, payload, timeout=_TIMEOUT)
        latencies = []
        for _ in range(count):
            started = time.perf_counter()
            reply = await nc.request(_ECHO, payload, timeout=_TIMEOUT)
            latencies.append(time.perf_counter() - started)
            _check("nats-py sequential", reply.data, payload)
        await nc.close()
        return latencies

    return _percentiles(asyncio.run(main()))


def _facade_sequential(url: str, count: int, payload: bytes) -> dict[str, float]:
    latencies = []
    with SyncNatsCluster("bench", [url], _log, timeout=_TIMEOUT) as cluster:
        request = cluster.request
        for _ in range(20):  # warm up, as for nats-py
            request(_ECHO, payload)
        for _ in range(count):
            started = time.perf_counter()
            reply = request(_ECHO, payload)
            latencies.append(time.perf_counter() - started)
            _check("facade sequential", reply.data, payload)
    return _percentiles(latencies)


def _plain_concurrent(url: str, count: int, payload: bytes) -> float:
    per_task = count // _THREADS

    async def main() -> float:
        nc = await nats.connect(url)
        await nc.request(_ECHO, payload, timeout=_TIMEOUT)

        async def work() -> None:
            for _ in range(per_task):
                _check("nats-py tasks", (await nc.request(_ECHO, payload, timeout=_TIMEOUT)).data, payload)

        started = time.perf_counter()
        await asyncio.gather(*(work() for _ in range(_THREADS)))
        elapsed = time.perf_counter() - started
        await nc.close()
        return per_task * _THREADS / elapsed

    return asyncio.run(main())


def _facade_concurrent(url: str, count: int, payload: bytes) -> float:
    per_thread = count // _THREADS
    with SyncNatsCluster("bench", [url], _log, timeout=_TIMEOUT) as cluster:
        cluster.request(_ECHO, payload)

        def work() -> None:
            request = cluster.request
            for _ in range(per_thread):
                _check("facade threads", request(_ECHO, payload).data, payload)

        workers = [threading.Thread(target=work) for _ in range(_THREADS)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
    return per_thread * _THREADS / elapsed


@contextlib.contextmanager
def _one_cpu() -> Iterator[bool]:
    """Keep the calling thread, and the threads it starts meanwhile, on one CPU (yields
    False, changing nothing, where the platform cannot)."""
    getter = getattr(os, "sched_getaffinity", None)
    setter = getattr(os, "sched_setaffinity", None)
    if getter is None or setter is None:
        yield False
        return
    allowed = getter(0)
    if len(allowed) < 2:
        yield False
        return
    setter(0, {min(allowed)})
    try:
        yield True
    finally:
        setter(0, allowed)


def thread_handoff_us(same_cpu: bool, rounds: int = 5000) -> float | None:
    """The time, in microseconds, for one blocked thread to wake another (two threads
    passing the turn back and forth through locks), the two kept on two CPUs or on one;
    None where the platform cannot place threads."""
    getter = getattr(os, "sched_getaffinity", None)
    setter = getattr(os, "sched_setaffinity", None)
    if getter is None or setter is None or len(getter(0)) < 2:
        return None
    allowed = getter(0)
    first, second = sorted(allowed)[:2]
    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()

    def other() -> None:
        setter(0, {first if same_cpu else second})
        for _ in range(rounds):
            ping.acquire()
            pong.release()

    setter(0, {first})
    try:
        thread = threading.Thread(target=other, daemon=True)
        thread.start()
        time.sleep(0.2)  # placed, and blocked on its lock
        started = time.perf_counter()
        for _ in range(rounds):
            ping.release()
            pong.acquire()
        elapsed = time.perf_counter() - started
        thread.join()
    finally:
        setter(0, allowed)
    return elapsed / rounds / 2 * 1e6


# -- serving: the same requester process drives either responder ---------------------------
def _drive(url: str, count: int, size: int) -> float:
    """Start the requester process, let it run, return its rate of answered requests."""
    child = _helper("--requester", url, count, size)
    assert child.stdin is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    result = json.loads(_stop(child))
    if result["answered"] != result["expected"]:
        raise RuntimeError(f"serve: {result['answered']} of {result['expected']} requests answered")
    return float(result["rate"])


def _plain_serve(url: str, count: int, size: int) -> float:
    async def main() -> float:
        nc = await nats.connect(url)

        async def on_request(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(_SERVE, cb=on_request, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.flush()
        rate = await asyncio.to_thread(_drive, url, count, size)
        await nc.close()
        return rate

    return asyncio.run(main())


def _facade_serve(url: str, count: int, size: int) -> float:
    def echo(msg: Msg) -> bytes:
        return msg.data

    with SyncNatsCluster("bench", [url], _log, timeout=_TIMEOUT) as cluster:
        cluster.serve(_SERVE, echo, workers=_WORKERS)
        return _drive(url, count, size)


# -- the helper processes ----------------------------------------------------------------
def _run_responder(url: str) -> None:
    """A nats-py echo responder on ``bench.request.echo``, until stdin closes."""

    async def main() -> None:
        nc = await nats.connect(url)

        async def on_request(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(_ECHO, cb=on_request, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.flush()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.to_thread(sys.stdin.read)
        await nc.close()

    asyncio.run(main())


def _run_requester(url: str, count: int, size: int) -> None:
    """Once told to on stdin, send *count* requests to ``bench.request.serve`` from 8
    concurrent tasks; print the rate of answered requests as JSON."""

    async def main() -> None:
        nc = await nats.connect(url)
        payload = b"x" * size
        per_task = count // _THREADS
        answered = 0
        deadline = time.monotonic() + 10
        while True:  # the responder subscribed before this process started; make sure
            try:
                await nc.request(_SERVE, payload, timeout=1)
                break
            except nats.errors.NoRespondersError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.to_thread(sys.stdin.readline)

        async def work() -> None:
            nonlocal answered
            for _ in range(per_task):
                reply = await nc.request(_SERVE, payload, timeout=_TIMEOUT)
                answered += reply.data == payload

        started = time.perf_counter()
        await asyncio.gather(*(work() for _ in range(_THREADS)))
        elapsed = time.perf_counter() - started
        await nc.close()
        sys.stdout.write(
            json.dumps({"answered": answered, "expected": per_task * _THREADS, "rate": answered / elapsed})
        )

    asyncio.run(main())


# -- driver ------------------------------------------------------------------------------
def requests_benchmark(url: str, count: int, size: int, rounds: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run the three measurements (see the module docstring) and return medians and the
    facade's ratios to nats-py."""
    payload = b"x" * size
    sequential: dict[str, list[dict[str, float]]] = {"plain": [], "facade": []}
    rates: dict[str, list[float]] = {
        name: []
        for name in ("plain_threads", "facade_threads", "plain_one_cpu", "facade_one_cpu")
        + ("plain_serve", "facade_serve")
    }

    responder = _helper("--responder", url)
    try:
        seq_paths: list[tuple[str, Callable[[], dict[str, float]]]] = [
            ("plain", lambda: _plain_sequential(url, count, payload)),
            ("facade", lambda: _facade_sequential(url, count, payload)),
        ]
        rate_paths: list[tuple[str, Callable[[], float]]] = [
            ("plain_threads", lambda: _plain_concurrent(url, count, payload)),
            ("facade_threads", lambda: _facade_concurrent(url, count, payload)),
        ]
        for round_no in range(rounds):
            flip = round_no % 2 == 1
            for name, measure in reversed(seq_paths) if flip else seq_paths:
                sequential[name].append(measure())
                got = sequential[name][-1]
                progress(
                    f"requests round {round_no + 1}  {name:<16} p50 {got['p50_ms']:.3f} ms  p99 {got['p99_ms']:.3f} ms"
                )
            for name, measure_rate in reversed(rate_paths) if flip else rate_paths:
                rates[name].append(measure_rate())
                progress(f"requests round {round_no + 1}  {name:<16} {rates[name][-1]:>10,.0f} req/s")
            with _one_cpu() as pinned:
                if pinned:
                    for name, measure_rate in reversed(rate_paths) if flip else rate_paths:
                        one_cpu = name.replace("_threads", "_one_cpu")
                        rates[one_cpu].append(measure_rate())
                        progress(f"requests round {round_no + 1}  {one_cpu:<16} {rates[one_cpu][-1]:>10,.0f} req/s")
    finally:
        _stop(responder)
    serve_paths: list[tuple[str, Callable[[], float]]] = [
        ("plain_serve", lambda: _plain_serve(url, count, size)),
        ("facade_serve", lambda: _facade_serve(url, count, size)),
    ]
    for round_no in range(rounds):
        for name, measure_rate in reversed(serve_paths) if round_no % 2 else serve_paths:
            rates[name].append(measure_rate())
            progress(f"requests round {round_no + 1}  {name:<16} {rates[name][-1]:>10,.0f} req/s")
    result: dict[str, Any] = {"size": size, "requests": count, "threads": _THREADS, "workers": _WORKERS}
    for name, runs in sequential.items():
        for key in ("p50_ms", "p99_ms"):
            result[f"{name}_sequential_{key}"] = statistics.median(run[key] for run in runs)
    result["sequential_p50_ratio"] = result["facade_sequential_p50_ms"] / result["plain_sequential_p50_ms"]
    for name, measured in rates.items():
        if measured:
            result[name] = statistics.median(measured)
    result["threads_ratio"] = result["facade_threads"] / result["plain_threads"]
    if rates["facade_one_cpu"]:
        result["one_cpu_ratio"] = result["facade_one_cpu"] / result["plain_one_cpu"]
    across, on_one = thread_handoff_us(False), thread_handoff_us(True)
    if across is not None and on_one is not None:
        result["handoff_across_cpus_us"], result["handoff_one_cpu_us"] = across, on_one
    result["serve_ratio"] = result["facade_serve"] / result["plain_serve"]
    return result


def format_requests(result: dict[str, Any]) -> list[str]:
    """The table section of :func:`requests_benchmark`'s result."""
    r = result
    return [
        "",
        f"request/reply {r['size']} B x {r['requests']} (responder: nats-py echo in another process)",
        f"  1 thread, sequential   p50/p99 ms: "
        f"nats-py {r['plain_sequential_p50_ms']:.3f}/{r['plain_sequential_p99_ms']:.3f}"
        f"  facade {r['facade_sequential_p50_ms']:.3f}/{r['facade_sequential_p99_ms']:.3f}"
        f"  p50 ratio {r['sequential_p50_ratio']:.2f}x (target <= 1.3x)",
        f"  {r['threads']} threads at once  req/s: nats-py {r['threads']} tasks {r['plain_threads']:,.0f}"
        f"  facade {r['facade_threads']:,.0f} ({r['threads_ratio']:.2f}x, target >= 0.85x)",
        *(
            [
                f"  the same, this process on one CPU: nats-py {r['plain_one_cpu']:,.0f}"
                f"  facade {r['facade_one_cpu']:,.0f} ({r['one_cpu_ratio']:.2f}x)"
            ]
            if "one_cpu_ratio" in r
            else []
        ),
        *(
            [
                f"  a thread waking another: {r['handoff_across_cpus_us']:.1f} us across two CPUs,"
                f" {r['handoff_one_cpu_us']:.1f} us on one (8 threads need 8 wake-ups per round)"
            ]
            if "handoff_one_cpu_us" in r
            else []
        ),
        f"  serving, answered req/s: nats-py async responder {r['plain_serve']:,.0f}"
        f"  serve(workers={r['workers']}) {r['facade_serve']:,.0f} ({r['serve_ratio']:.2f}x, target >= 0.8x)",
    ]


def _helper_main(argv: list[str]) -> None:
    if argv[:1] == ["--responder"]:
        _run_responder(argv[1])
    elif argv[:1] == ["--requester"]:
        _run_requester(argv[1], int(argv[2]), int(argv[3]))
    else:
        raise SystemExit("use `openfactory-nats bench`")


if __name__ == "__main__":  # the helper processes
    _helper_main(sys.argv[1:])
