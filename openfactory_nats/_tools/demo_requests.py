"""The demo's request/reply section: threads send requests to a ``serve`` handler on
worker threads; every reply must be the one for its own request."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from .._blocking.facade import SyncNatsCluster
from .._errors import NatsClusterError
from .._message import Msg

__all__ = ("run_request_demo",)

_log = logging.getLogger("openfactory_nats.demo")


def _percentile(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def run_request_demo(
    urls: list[str],
    *,
    threads: int = 4,
    requests: int = 250,
    workers: int = 4,
    timeout: float = 10.0,
    options: dict[str, Any] | None = None,
) -> tuple[bool, str]:
    """*threads* threads each send *requests* requests, one after the other, to a handler
    served by *workers* threads; each reply must carry its request's id. Returns whether
    none failed, and the lines to print."""
    subject = f"demo.{uuid.uuid4().hex[:8]}.state"
    latencies: list[list[float]] = [[] for _ in range(threads)]
    failures: list[str] = []
    lock = threading.Lock()

    def handler(msg: Msg) -> bytes:
        return b"state of " + msg.data

    with SyncNatsCluster("demo-requests", urls, _log, timeout=timeout, **(options or {})) as nats:
        nats.serve(subject, handler, workers=workers)

        def requester(index: int) -> None:
            mine = latencies[index]
            for seq in range(requests):
                request_id = b"%d-%d" % (index, seq)
                started = time.perf_counter()
                try:
                    reply = nats.request(subject, request_id, timeout)
                except NatsClusterError as exc:
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                mine.append((time.perf_counter() - started) * 1000)
                if reply.data != b"state of " + request_id:
                    with lock:
                        failures.append(f"request {request_id!r} got {reply.data[:40]!r}")

        pool = [threading.Thread(target=requester, args=(i,), name=f"demo-requester-{i}") for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    ordered = sorted(t for per_thread in latencies for t in per_thread)
    total = threads * requests
    failed = total - len(ordered) + sum(1 for f in failures if f.startswith("request "))
    for failure in failures[:3]:
        _log.error("request/reply demo: %s", failure)
    lines = [
        "== request/reply",
        f"requests   {total} from {threads} threads to serve(workers={workers}): "
        f"p50 {_percentile(ordered, 0.5):.3f} ms  p99 {_percentile(ordered, 0.99):.3f} ms, "
        f"{failed} failed: {'OK' if not failed else 'FAILED'}",
    ]
    return not failed, "\n".join(lines)
