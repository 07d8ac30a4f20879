"""Publish throughput, latency and memory (and, through the other bench modules, receiving
and request/reply), side by side with plain nats-py.

Every facade figure is reported as a ratio to plain nats-py asyncio publishing measured in
the same run against the same server; rounds alternate between the paths and medians are
quoted. Run it with ``openfactory-nats bench`` or ``python benchmarks/bench_publish.py``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import nats

from .._blocking.facade import SyncNatsCluster
from .._errors import BufferFullError
from .bench_js import format_jetstream, jetstream_benchmark
from .bench_kv import format_kv, kv_benchmark
from .bench_receive import format_receive, receive_benchmark
from .bench_requests import format_requests, requests_benchmark
from .embedded import EmbeddedServer

__all__ = ("BenchConfig", "run_benchmark")

_log = logging.getLogger("openfactory_nats.bench")
_SUBJECT = "bench.publish"
_MIB = 1024 * 1024


@dataclass
class BenchConfig:
    """What to measure."""

    servers: list[str] | None = None
    messages: int = 200_000
    sizes: Sequence[int] = (16, 128, 1024, 4096, 16384, 65536, 1024 * 1024)
    rounds: int = 5
    naive_messages: int = 20_000
    latency_seconds: float = 3.0
    latency_rate: int = 10_000
    stall: bool = True
    receive: bool = True
    #: Requests per request/reply measurement; 0 skips them.
    requests: int = 2000
    #: Messages of the JetStream consume measurement; 0 skips it.
    jetstream: int = 100_000
    kv: int = 100_000
    stall_cap: int = 64 * _MIB
    #: Bytes each run publishes at most (so that large sizes do not take minutes).
    byte_budget: int = 1024 * _MIB
    samples: dict[str, list[float]] = field(default_factory=dict)

    def count_for(self, size: int) -> int:
        return max(1000, min(self.messages, self.byte_budget // max(size, 1)))


# -- the paths compared ----------------------------------------------------------------
def _plain(url: str, count: int, payload: bytes) -> float:
    async def main() -> float:
        nc = await nats.connect(url)
        started = time.perf_counter()
        for _ in range(count):
            await nc.publish(_SUBJECT, payload)
        # nats-py writes a flush's PING ahead of what is still pending; the second round
        # trip starts after the flusher has written everything, so it proves delivery.
        await nc.flush(timeout=60)
        await nc.flush(timeout=60)
        elapsed = time.perf_counter() - started
        await nc.close()
        return count / elapsed

    return asyncio.run(main())


def _raw(url: str, count: int, payload: bytes) -> float:
    """The ceiling: frames built in Python and written with one ``sendall`` per batch
    (up to 1 MiB), no client library; a PING/PONG at the end proves delivery."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=60) as sock:
        reader = sock.makefile("rb")
        if not reader.readline().startswith(b"INFO "):
            raise RuntimeError(f"{url} did not greet with INFO")
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\nPING\r\n')
        _await_pong(sock, reader)
        subject = _SUBJECT.encode()
        per_batch = max(1, min(1000, _MIB // max(len(payload), 1)))
        started = time.perf_counter()
        sent = 0
        while sent < count:
            batch = min(per_batch, count - sent)
            sock.sendall(b"".join([b"PUB %b %d\r\n%b\r\n" % (subject, len(payload), payload) for _ in range(batch)]))
            sent += batch
        sock.sendall(b"PING\r\n")
        _await_pong(sock, reader)
        return count / (time.perf_counter() - started)


def _await_pong(sock: socket.socket, reader: Any) -> None:
    while True:
        line = reader.readline()
        if line.startswith(b"PONG"):
            return
        if line.startswith(b"PING"):
            sock.sendall(b"PONG\r\n")
        elif not line or line.startswith(b"-ERR"):
            raise RuntimeError(f"the server refused the raw connection: {line!r}")


def _naive(url: str, count: int, payload: bytes) -> float:
    """One blocking ``run_coroutine_threadsafe(...).result()`` per message."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        nc = asyncio.run_coroutine_threadsafe(nats.connect(url), loop).result(10)
        started = time.perf_counter()
        for _ in range(count):
            asyncio.run_coroutine_threadsafe(nc.publish(_SUBJECT, payload), loop).result(10)
        asyncio.run_coroutine_threadsafe(nc.flush(timeout=60), loop).result(70)
        elapsed = time.perf_counter() - started
        asyncio.run_coroutine_threadsafe(nc.close(), loop).result(10)
        return count / elapsed
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def _facade(url: str, count: int, payload: bytes, threads: int) -> float:
    per_thread = count // threads
    with SyncNatsCluster("bench", [url], _log, timeout=60) as cluster:
        cluster.connect()

        def work() -> None:
            publish = cluster.publish
            for _ in range(per_thread):
                publish(_SUBJECT, payload)

        workers = [threading.Thread(target=work) for _ in range(threads)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        cluster.flush(60)
        elapsed = time.perf_counter() - started
    return per_thread * threads / elapsed


# -- latency ------------------------------------------------------------------------------
def _latency(url: str, seconds: float, rate: int) -> dict[str, float]:
    """Publish *rate* msgs/s from one thread; a subscriber process measures the latency.

    Payloads carry ``time.monotonic_ns()``, a clock shared by all processes on the host.
    """
    count = int(seconds * rate)
    child = subprocess.Popen(
        [sys.executable, "-m", "openfactory_nats._tools.bench", "--latency-subscriber", url, str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("latency subscriber did not start")
        with SyncNatsCluster("latency", [url], _log) as cluster:
            cluster.connect()
            interval = 1.0 / rate
            start = time.perf_counter()
            for i in range(count):
                # Sleep rather than spin: a spinning thread would keep the GIL from the
                # event-loop thread for a whole switch interval (5 ms).
                delay = start + i * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                cluster.publish(_SUBJECT, b"%d" % time.monotonic_ns())
            cluster.flush(10)
        out, _ = child.communicate(timeout=seconds + 30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
    result: dict[str, float] = json.loads(out)
    return result


def _latency_subscriber(url: str, count: int) -> None:
    async def main() -> None:
        received: list[int] = []
        done = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            received.append(time.monotonic_ns() - int(msg.data))
            if len(received) >= count:
                done.set()

        nc = await nats.connect(url)
        await nc.subscribe(_SUBJECT, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.flush()
        print("ready", flush=True)
        try:
            await asyncio.wait_for(done.wait(), timeout=count / 1000 + 30)
        except TimeoutError:
            pass
        await nc.close()
        ordered = sorted(received)

        def pct(p: float) -> float:
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] / 1e6 if ordered else float("nan")

        summary = {"received": len(ordered), "expected": count, "p50_ms": pct(0.5), "p99_ms": pct(0.99)}
        summary |= {"p999_ms": pct(0.999), "max_ms": ordered[-1] / 1e6 if ordered else float("nan")}
        print(json.dumps(summary))

    asyncio.run(main())


# -- memory against a stalled server --------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _stall(url: str, server_pid: int, cap: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "openfactory_nats._tools.bench", "--stall-child", url, str(server_pid), str(cap)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def _stall_child(url: str, server_pid: int, cap: int) -> None:
    """Threads publish 1 MiB messages (a new payload each time) while the server is
    SIGSTOPped; report RSS growth."""
    payload = b"x" * (_MIB - 64)
    peak = 0
    refused = 0
    stop = threading.Event()
    with SyncNatsCluster("stall", [url], _log, max_pending_bytes=cap, drain_timeout=1.0) as cluster:
        cluster.connect()
        cluster.publish(_SUBJECT, payload)
        cluster.flush(10)
        baseline = _rss_bytes()
        os.kill(server_pid, signal.SIGSTOP)
        try:

            def work() -> None:
                nonlocal refused
                while not stop.is_set():
                    try:
                        # A new payload each time, as a forwarder's messages are: what the
                        # library holds of them is what the cap must bound.
                        cluster.publish(_SUBJECT, payload[:-1] + b"x", timeout=0.2)
                    except BufferFullError:
                        refused += 1

            workers = [threading.Thread(target=work) for _ in range(4)]
            for worker in workers:
                worker.start()
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline:
                peak = max(peak, _rss_bytes())
                time.sleep(0.01)
            stop.set()
            for worker in workers:
                worker.join(10)
            peak = max(peak, _rss_bytes())
        finally:
            os.kill(server_pid, signal.SIGCONT)
    growth = peak - baseline
    print(json.dumps({"cap_mib": cap / _MIB, "rss_growth_mib": growth / _MIB, "ratio_to_cap": growth / cap,
                      "refused": refused}))  # fmt: skip


# -- driver ------------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _in_msgs(server: EmbeddedServer | None) -> int | None:
    if server is None:
        return None
    with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/varz", timeout=5) as resp:
        return int(json.loads(resp.read())["in_msgs"])


def _check_delivery(server: EmbeddedServer | None, name: str, before: int | None, expected: int) -> None:
    """Every message of a run must have reached the server (its own ``in_msgs`` count)."""
    if server is None or before is None:
        return
    deadline = time.monotonic() + 10
    received = 0
    while time.monotonic() < deadline:
        received = (_in_msgs(server) or 0) - before
        if received >= expected:
            break
        time.sleep(0.05)
    if received != expected:
        raise RuntimeError(f"{name}: the server received {received} of {expected} messages")


def run_benchmark(config: BenchConfig, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run every measurement and return the results (see :func:`format_table`)."""
    server = None if config.servers else EmbeddedServer("bench").start()
    url = config.servers[0] if config.servers else server.url  # type: ignore[union-attr]
    results: dict[str, Any] = {"machine": _machine(server), "throughput": [], "delivery_checked": server is not None}
    try:
        for size in config.sizes:
            count = config.count_for(size)
            payload = b"x" * size
            runs: dict[str, list[float]] = {"plain": [], "facade_1": [], "facade_8": [], "raw": []}
            naive = config.naive_messages
            paths: list[tuple[str, Callable[[], float], int]] = [
                ("plain", partial(_plain, url, count, payload), count),
                ("facade_1", partial(_facade, url, count, payload, 1), count),
                ("facade_8", partial(_facade, url, count, payload, 8), count // 8 * 8),
                ("raw", partial(_raw, url, count, payload), count),
            ]
            if size == 128:
                runs["naive"] = []
                paths.append(("naive", partial(_naive, url, naive, payload), naive))
            for round_no in range(config.rounds):
                ordered = paths if round_no % 2 == 0 else list(reversed(paths))
                for name, measure, expected in ordered:
                    before = _in_msgs(server)
                    rate = measure()
                    _check_delivery(server, name, before, expected)
                    runs[name].append(rate)
                    progress(f"{size:>6} B  round {round_no + 1}  {name:<9} {rate:>12,.0f} msgs/s")
            plain = _median(runs["plain"])
            row: dict[str, Any] = {"size": size, "messages": count, "plain": plain}
            for name in runs:
                if name != "plain":
                    row[name] = _median(runs[name])
                    row[f"{name}_ratio"] = row[name] / plain
            results["throughput"].append(row)
        if config.receive:
            results["receive"] = receive_benchmark(
                url, config.messages, 128, config.rounds, config.latency_seconds, progress
            )
        if config.requests:
            results["requests"] = requests_benchmark(url, config.requests, 128, config.rounds, progress)
        if config.jetstream:
            results["jetstream"] = jetstream_benchmark(config.jetstream, config.rounds, progress)
        if config.kv:
            results["kv"] = kv_benchmark(config.kv, config.rounds, progress)
        if config.latency_seconds > 0:
            progress(f"latency: {config.latency_rate} msgs/s for {config.latency_seconds:g} s")
            results["latency"] = _latency(url, config.latency_seconds, config.latency_rate)
        if config.stall and server is not None and server.proc is not None:
            progress("stalled server: 4 threads publishing 1 MiB messages")
            results["stall"] = _stall(url, server.proc.pid, config.stall_cap)
    finally:
        if server is not None:
            server.close()
    return results


def _machine(server: EmbeddedServer | None) -> dict[str, Any]:
    version = "?"
    if server is not None:
        out = subprocess.run([server.args()[0], "--version"], capture_output=True, text=True, check=False)
        version = out.stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "nats_py": importlib.metadata.version("nats-py"),
        "nats_server": version,
    }


def format_table(results: dict[str, Any]) -> str:
    """Render results as a plain-text table."""
    m = results["machine"]
    lines = [
        f"{m['date']}  {m['cpus']} CPUs {m['cpu']}  Python {m['python']}  nats-py {m['nats_py']}  {m['nats_server']}",
        "",
        f"{'payload':>8} {'messages':>9} {'nats-py':>12} {'facade 1 thr':>20} {'facade 8 thr':>20} "
        f"{'raw socket':>20} {'naive r_c_t':>18}",
    ]
    for row in results["throughput"]:
        naive = f"{row['naive']:>9,.0f} {row['naive_ratio']:>5.2f}x" if "naive" in row else ""
        lines.append(
            f"{row['size']:>7}B {row['messages']:>9} {row['plain']:>12,.0f} "
            f"{row['facade_1']:>12,.0f} {row['facade_1_ratio']:>5.2f}x "
            f"{row['facade_8']:>12,.0f} {row['facade_8_ratio']:>5.2f}x "
            f"{row['raw']:>12,.0f} {row['raw_ratio']:>5.2f}x {naive:>18}"
        )
    lines.append(
        "(msgs/s, medians; ratios are to nats-py asyncio in the same run; raw socket: frames built in\n"
        " Python and written with one sendall per batch of up to 1 MiB, no client library: the ceiling)"
    )
    if "latency" in results:
        lat = results["latency"]
        lines.append(
            f"latency at {lat['received']}/{lat['expected']} msgs: p50 {lat['p50_ms']:.3f} ms  "
            f"p99 {lat['p99_ms']:.3f} ms  p99.9 {lat['p999_ms']:.3f} ms  max {lat['max_ms']:.3f} ms"
        )
    if "stall" in results:
        st = results["stall"]
        lines.append(
            f"stalled server: RSS grew {st['rss_growth_mib']:.1f} MiB against a cap of {st['cap_mib']:.0f} MiB "
            f"({st['ratio_to_cap']:.2f}x); {st['refused']:.0f} publishes refused with BufferFullError"
        )
    if "receive" in results:
        lines += format_receive(results["receive"])
    if "requests" in results:
        lines += format_requests(results["requests"])
    if "jetstream" in results:
        lines += format_jetstream(results["jetstream"])
    if "kv" in results:
        lines += format_kv(results["kv"])
    return "\n".join(line.rstrip() for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m openfactory_nats._tools.bench`` (also the helper processes)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--latency-subscriber"]:
        _latency_subscriber(args[1], int(args[2]))
        return 0
    if args[:1] == ["--stall-child"]:
        _stall_child(args[1], int(args[2]), int(args[3]))
        return 0
    raise SystemExit("use `openfactory-nats bench` or benchmarks/bench_publish.py")


if __name__ == "__main__":
    sys.exit(main())
