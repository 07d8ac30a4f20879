"""An inbox's limits (what fits in them), and what it loses: counted, added to its
clusters' tallies, and reported to the log.

Losses are counted apart: :attr:`Losses.dropped` when the limits were full (the consumer
is too slow; reported at WARNING at most once every :data:`DROP_REPORT_INTERVAL`
seconds), :attr:`Losses.discarded` when the subscription was closed (messages still
pending on ``close(drain=False)``, left over after a drain ran out of time; those are
reported once, at WARNING when a drain ran out of time), :attr:`Losses.refused` when
they arrived after the close, and :attr:`Losses.errors` raised by the callback.

The inbox writes the counters, each with one writer or under the inbox's lock; the
reports take that lock, which they are given (a forked child renews it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from .._errors import InvalidMessageError, InvalidTypeError
from .._message import Msg
from .._stats import Tally

__all__ = ("DEFAULT_MAX_BYTES", "DEFAULT_MAX_MSGS", "DROP_REPORT_INTERVAL", "Losses", "append_what_fits", "check_limit")

DEFAULT_MAX_MSGS = 65536
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: Seconds between two WARNING lines about dropped messages, per subscription.
DROP_REPORT_INTERVAL = 5.0


def check_limit(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise InvalidMessageError(f"{name} must be at least 1, not {value}")
    return value


def append_what_fits(items: deque[Msg], batch: list[Msg], room: int, free: int) -> tuple[int, int]:
    """Append to *items* the messages of *batch* that fit, each in turn, in *room*
    messages and *free* bytes; return their bytes, and how many did not fit."""
    append = items.append
    taken = 0
    dropped = 0
    for msg in batch:
        size = msg._size
        if room and size <= free:
            append(msg)
            room -= 1
            free -= size
            taken += size
        else:
            dropped += 1
    return taken, dropped


class Losses:
    """The losses of one inbox (see the module docstring); the comment of each counter
    says who writes it."""

    def __init__(self, cluster: str, subject: str, logger: logging.Logger, max_msgs: int, max_bytes: int) -> None:
        self.cluster = cluster
        self.subject = subject
        self.max_msgs = max_msgs
        self.max_bytes = max_bytes
        self._logger = logger
        self.dropped = 0  # offer, under the lock
        self.refused = 0  # offer, under the lock
        self.discarded = 0  # under the lock
        self.errors = 0  # the token holder
        self.tallies: tuple[Tally, ...] = ()  # where the counts are added too: the clusters' (under the lock)
        self.cut = False  # a drain ran out of time (under the lock)
        self._reported = 0  # under the lock
        self._discards_reported = False  # under the lock
        self._next_report = 0.0  # offer

    def tell(self, *, dropped: int = 0, errors: int = 0, discarded: int = 0) -> None:
        for tally in self.tallies:
            tally.add(dropped=dropped, errors=errors, discarded=discarded)

    def note_drops(self, lock: threading.Lock) -> None:
        """(Offer, after drops) Report them, unless a report was made lately."""
        now = time.monotonic()
        if now < self._next_report:
            return
        self._next_report = now + DROP_REPORT_INTERVAL
        self.report_drops(lock)

    def report_drops(self, lock: threading.Lock) -> None:
        with lock:
            total = self.dropped
            count = total - self._reported
            self._reported = total
        if count:
            self._logger.warning(
                "cluster %r: subscription %r is too slow: %d message(s) dropped since the last report "
                "(%d in all; limits %d messages, %d bytes)",
                self.cluster,
                self.subject,
                count,
                total,
                self.max_msgs,
                self.max_bytes,
            )

    def report_discards(self, lock: threading.Lock) -> None:
        """Log, once, the messages that were pending when the subscription ended."""
        with lock:
            if self._discards_reported or not self.discarded:
                return
            self._discards_reported = True
            count, cut = self.discarded, self.cut
        if cut:
            self._logger.warning(
                "cluster %r: subscription %r: %d received message(s) discarded, still pending when the "
                "drain ran out of time",
                self.cluster,
                self.subject,
                count,
            )
        else:
            self._logger.info(
                "cluster %r: subscription %r: %d received message(s) discarded, still pending when it was closed",
                self.cluster,
                self.subject,
                count,
            )
