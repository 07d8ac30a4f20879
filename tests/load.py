"""Steady publishing from threads, with the outcome counted message by message."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoadResult:
    sent: dict[int, list[int]] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    slowest: float = 0.0

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.sent.values())


class SteadyLoad:
    """*threads* threads call ``publish(thread, seq)`` at *rate* msgs/s in total."""

    def __init__(
        self, publish: Callable[[int, int], Any], threads: int = 4, rate: float = 1000.0, limit: int | None = None
    ) -> None:
        self.publish = publish
        self.limit = limit
        self.threads = threads
        self.interval = threads / rate
        self.result = LoadResult(sent={t: [] for t in range(threads)})
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def _run(self, t: int) -> None:
        start = time.perf_counter()
        seq = 0
        while not self._stop.is_set() and (self.limit is None or seq < self.limit):
            delay = start + seq * self.interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            began = time.monotonic()
            try:
                self.publish(t, seq)
            except BaseException as exc:
                with self._lock:
                    self.result.errors.append(exc)
            else:
                self.result.sent[t].append(seq)
            with self._lock:
                self.result.slowest = max(self.result.slowest, time.monotonic() - began)
            seq += 1

    def __enter__(self) -> SteadyLoad:
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)

    def wait(self, timeout: float) -> None:
        """Wait for the threads to reach their limit."""
        for worker in self._workers:
            worker.join(timeout)


def count(messages: list[Any], result: LoadResult) -> dict[str, int]:
    """Loss and duplicates at a subscriber, for payloads ``b"<thread>:<seq>"``."""
    seen: set[tuple[int, int]] = set()
    duplicates = 0
    out_of_order = 0
    last: dict[int, int] = {}
    for msg in messages:
        t, seq = (int(x) for x in msg.data.split(b":"))
        if (t, seq) in seen:
            duplicates += 1
            continue
        seen.add((t, seq))
        if seq < last.get(t, -1):
            out_of_order += 1
        last[t] = seq
    expected = {(t, s) for t, seqs in result.sent.items() for s in seqs}
    return {
        "sent": len(expected),
        "lost": len(expected - seen),
        "duplicates": duplicates,
        "out_of_order": out_of_order,
    }


def publish_until_closed(
    cluster: Any, threads: int, payload: Callable[[int, int], bytes], run_for: float
) -> tuple[dict[int, int], list[BaseException]]:
    """*threads* threads publish ``payload(thread, n)`` (n = 0, 1, ...) to ``race.<thread>``
    until ``cluster.close(timeout=0.2)``, called after *run_for* s, refuses them with
    ``ClusterClosedError``. Returns how many each had accepted, and the other errors."""
    from openfactory_nats import ClusterClosedError

    accepted: dict[int, int] = {}
    errors: list[BaseException] = []
    go = threading.Event()

    def publisher(t: int) -> None:
        go.wait()
        n = 0
        try:
            while True:
                cluster.publish(f"race.{t}", payload(t, n))
                n += 1
        except ClusterClosedError:
            pass
        except BaseException as exc:
            errors.append(exc)
        accepted[t] = n

    workers = [threading.Thread(target=publisher, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    go.set()
    time.sleep(run_for)
    cluster.close(timeout=0.2)
    for worker in workers:
        worker.join(10)
    return accepted, errors
