"""Thread-safe counters."""

from __future__ import annotations

import threading

from ._forksafe import renew_after_fork

__all__ = ("COUNTERS", "Stats")

COUNTERS = (
    "published",
    "bytes",
    "acked",
    "errors",
    "reconnects",
    "disconnects",
    "replayed",
    "dropped",
    "dropped_bytes",
    "refused",
    "requests",
)


class Stats:
    """Named integer counters, safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTERS, 0)
        renew_after_fork(self)

    def _renew_after_fork(self) -> None:
        self._lock = threading.Lock()

    def add(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self._values[key] += amount

    def get(self, key: str) -> int:
        return self._values[key]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
