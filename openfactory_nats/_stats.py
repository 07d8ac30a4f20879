"""Thread-safe counters."""

from __future__ import annotations

import threading

from ._forksafe import renew_after_fork

__all__ = ("COUNTERS", "Stats", "Tally")

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
    "js_processed",
    "js_failed",
    "js_ack_errors",
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


class Tally:
    """The counts of a cluster's subscriptions, kept apart from the subscriptions: each
    of them adds its own here as they happen (any thread), so that the totals outlive
    the subscriptions without anyone keeping them, and never decrease."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received = 0
        self.dropped = 0
        self.errors = 0
        self.discarded = 0
        renew_after_fork(self)

    def _renew_after_fork(self) -> None:
        self._lock = threading.Lock()

    def add(self, *, received: int = 0, dropped: int = 0, errors: int = 0, discarded: int = 0) -> None:
        with self._lock:
            self.received += received
            self.dropped += dropped
            self.errors += errors
            self.discarded += discarded

    def values(self) -> tuple[int, int, int, int]:
        """``(received, dropped, errors, discarded)``, read together."""
        with self._lock:
            return self.received, self.dropped, self.errors, self.discarded
