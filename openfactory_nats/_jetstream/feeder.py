"""Prefetching for a worker pool (``consume(..., prefetch=N)``).

By default each worker of a pool fetches its own message, one at a time: at most one
round trip's worth of messages per worker, fair to other processes of the same consumer,
but one pull request and one delivery per message. With *prefetch*, one feeder thread
fetches in batches for the idle workers plus up to *prefetch* messages more, queued
here. A queued message's ack wait runs, so the feeder keeps the messages that wait longer
than half of it alive with ``in_progress()``: none is redelivered while this pool holds
it. What is still queued when the pool stops is naked, so it is redelivered at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Protocol

from .._errors import ClusterClosedError, ConsumerNotFoundError, NatsClusterError, StreamNotFoundError
from .msg import JsMsg

__all__ = ("Feeder",)

_POLL = 1.0
_BACKOFF = 0.5
#: The largest batch of a fetch (idle workers plus a prefetch of 100000 ask for more).
_MAX_BATCH = 100_000


class PullSubscription(Protocol):
    @property
    def consumer(self) -> str: ...

    def fetch(self, batch: int = 1, timeout: float | None = None) -> list[JsMsg]: ...


class Feeder:
    """The feeder thread and its queue (see the module docstring)."""

    def __init__(
        self, sub: PullSubscription, workers: int, prefetch: int, ack_wait: float, logger: logging.Logger, name: str
    ) -> None:
        self._sub = sub
        self._prefetch = prefetch
        self._keep_alive_after = max(0.05, ack_wait / 2)
        self._logger = logger
        self._lock = threading.Lock()
        self._has_msgs = threading.Condition(self._lock)
        self._has_room = threading.Condition(self._lock)
        self._queue: deque[list[object]] = deque()  # [fetched or kept alive at, message]
        self._idle = workers
        self._workers = workers
        #: Fetch when at least this many can be taken (batches, not one at a time).
        self._low_water = max(1, (workers + prefetch) // 4)
        self._stopping = False
        self.thread = threading.Thread(target=self._feed, name=f"{name}-feeder", daemon=True)
        self.thread.start()

    def _credit(self) -> int:
        return self._idle + self._prefetch - len(self._queue)

    def _feed(self) -> None:
        sub = self._sub
        check_every = min(_POLL, self._keep_alive_after / 2)
        while True:
            with self._lock:
                while not self._stopping and self._credit() < self._low_water:
                    if not self._has_room.wait(check_every):
                        break
                if self._stopping:
                    return
                credit = self._credit()
            self._keep_alive()
            if credit < self._low_water:
                continue
            try:
                msgs = sub.fetch(min(credit, _MAX_BATCH), check_every)  # short: the keep-alive waits for it
            except ClusterClosedError:  # the cluster closed, or the pool was stopped
                self.stop()
                return
            except (ConsumerNotFoundError, StreamNotFoundError) as exc:  # nothing more will come
                self._logger.error("consumer %s: %s; the pool stops", sub.consumer, exc)
                self.stop()
                return
            except NatsClusterError as exc:
                self._logger.warning("consumer %s: fetch failed, retrying: %s", sub.consumer, exc)
                with self._lock:  # a pause stop() ends at once
                    if not self._stopping:
                        self._has_room.wait(min(_BACKOFF, check_every))
                continue
            if not msgs:
                continue
            now = time.monotonic()
            with self._lock:
                stopped = self._stopping
                if not stopped:
                    self._queue.extend([now, msg] for msg in msgs)
                    self._has_msgs.notify(len(msgs))
            if stopped:
                _nak_all(msgs)

    def _keep_alive(self) -> None:
        """``in_progress()`` for what has waited in the queue for half its ack wait."""
        now = time.monotonic()
        with self._lock:
            old = [entry for entry in self._queue if now - entry[0] >= self._keep_alive_after]  # type: ignore[operator]
            for entry in old:
                entry[0] = now
        for entry in old:
            msg = entry[1]
            assert isinstance(msg, JsMsg)
            try:
                msg.in_progress()
            except NatsClusterError:  # taken and acked meanwhile, or not sent: redelivered
                pass

    def take(self) -> JsMsg | None:
        """(A worker) The next message, waiting for one; None once stopping."""
        with self._lock:
            while not self._queue and not self._stopping:
                self._has_msgs.wait()
            if self._stopping:
                return None
            msg = self._queue.popleft()[1]
            self._idle -= 1
            if self._credit() >= self._low_water:
                self._has_room.notify()
        assert isinstance(msg, JsMsg)
        return msg

    def done(self, alive: bool = True) -> None:
        """(A worker) Its message is handled: it is idle again; or, not *alive*, it ended
        (its handler raised a BaseException). Once no worker is left, feeding stops."""
        with self._lock:
            if alive:
                self._idle += 1
            else:
                self._workers -= 1
            last = self._workers == 0
            if self._credit() >= self._low_water:
                self._has_room.notify()
        if last:  # nothing would take what is queued: give it back, keep nothing alive
            self.stop()

    def stop(self) -> None:
        """Stop feeding and taking; nak what is queued (redelivered at once)."""
        with self._lock:
            self._stopping = True
            left = [entry[1] for entry in self._queue]
            self._queue.clear()
            self._has_msgs.notify_all()
            self._has_room.notify_all()
        _nak_all(left)


def _nak_all(msgs: list[JsMsg] | list[object]) -> None:
    for msg in msgs:
        assert isinstance(msg, JsMsg)
        try:
            msg.nak()
        except NatsClusterError:
            pass  # counted by the acker; the server redelivers it after its ack wait
