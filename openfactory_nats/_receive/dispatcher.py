"""Worker threads that run subscription callbacks, shared by many subscriptions.

A :class:`Dispatcher` owns *threads* daemon threads and one run queue (a C
``queue.SimpleQueue``, whose ``put`` never blocks). What goes on the queue is not a
message but an :class:`~openfactory_nats._receive.inbox.Inbox` that has messages waiting.

An inbox is on the queue, or being run by a worker, at most once at a time: it holds a
*token* (a non-blocking ``Lock.acquire(False)``, the one atomic test-and-set pure Python
has) from the moment it is queued until its worker is done with it. This is what keeps
each subscription's messages in order and one at a time in its callback, while the
threads are shared. A worker runs at most *batch* messages of an inbox, then puts it back
at the end of the queue, so that a busy subscription cannot starve the others; a slow
callback holds up only its own subscription (and the one thread it runs on).

A subscription with a callback and no dispatcher gets a private one-thread dispatcher,
i.e. its own thread, which ends when the subscription is closed.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from queue import SimpleQueue
from types import TracebackType
from typing import Protocol

from .._errors import ClusterClosedError, InvalidMessageError, InvalidTypeError
from .._forksafe import renew_after_fork
from .._wire import check_timeout

__all__ = ("DEFAULT_BATCH", "Dispatcher", "Inbox", "delivering", "mark_delivering")


class Inbox(Protocol):
    """What a dispatcher runs: a subscription's thread-side queue
    (:class:`~openfactory_nats._receive.inbox.Inbox`)."""

    @property
    def cluster(self) -> str: ...

    def _run(self, budget: int) -> None:
        """Deliver up to *budget* waiting messages, then hand the token back."""

    def _finish(self) -> None:
        """Discard what waits (the dispatcher is closed)."""

    def _begin_close(self, drain: bool) -> None:
        """Stop taking messages; deliver what waits when *drain*."""


_local = threading.local()


def mark_delivering() -> None:
    """Mark the calling thread as one that runs user callbacks or handlers."""
    _local.delivering = True


def delivering() -> bool:
    """True on a thread that runs user callbacks or handlers (a close() made there must
    not wait for the deliveries to end: it would wait for itself)."""
    return bool(getattr(_local, "delivering", False))


#: Messages of one subscription a worker delivers before it turns to the next one.
DEFAULT_BATCH = 256

_log = logging.getLogger(__name__)


class _State(enum.Enum):
    RUNNING = "running"
    CLOSED = "closed"


class Dispatcher:
    """A pool of threads delivering the messages of many subscriptions to their callbacks.

    Each subscription's messages reach its callback in order, one at a time; different
    subscriptions run in parallel on up to *threads* threads.

    :param threads: the number of worker threads (started at once).
    :param name: the threads' name (``name-0``, ``name-1``, ...; just *name* for one).
    :param batch: messages of one subscription delivered before the thread turns to the
        next subscription waiting.
    :raises InvalidTypeError: when *threads* or *batch* is not an ``int``.
    :raises InvalidMessageError: when either is less than 1.
    """

    def __init__(
        self, threads: int = 4, *, name: str = "openfactory-nats-dispatcher", batch: int = DEFAULT_BATCH
    ) -> None:
        for label, value in (("threads", threads), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidTypeError(f"{label} must be an int, not {type(value).__name__}")
            if value < 1:
                raise InvalidMessageError(f"{label} must be at least 1, not {value}")
        self.name = name
        self.batch = batch
        self._state = _State.RUNNING
        self._lock = threading.Lock()
        self._runq: SimpleQueue[Inbox | None] = SimpleQueue()
        self._inboxes: set[Inbox] = set()
        self._threads = [
            threading.Thread(target=self._work, name=name if threads == 1 else f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()
        self._idents = frozenset(t.ident for t in self._threads)
        renew_after_fork(self)

    def _renew_after_fork(self) -> None:
        # A forked child closes or exits through this lock; a parent thread (the loop
        # queueing an inbox, a worker) may have held it at the fork.
        self._lock = threading.Lock()

    @property
    def threads(self) -> int:
        """The number of worker threads."""
        return len(self._threads)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._state is _State.CLOSED

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the threads, after closing (without draining) the subscriptions still using
        this dispatcher. Idempotent; safe from a callback running on this dispatcher (that
        thread is not waited for: it ends when the callback returns).

        :param timeout: seconds to wait, in all, for the threads to end.
        :returns: True when every thread (but the caller's) ended in time.
        """
        timeout = check_timeout(timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            first = self._state is _State.RUNNING
            self._state = _State.CLOSED
            inboxes = list(self._inboxes)
        if first:
            for inbox in inboxes:
                inbox._begin_close(drain=False)
            # Behind every queued inbox, so those are finished (discarding) before the end.
            for _ in self._threads:
                self._runq.put(None)
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads if t is not current)

    def is_worker(self) -> bool:
        """True when called from one of this dispatcher's threads (i.e. from a callback)."""
        return threading.get_ident() in self._idents

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Dispatcher {self.name!r} threads={len(self._threads)} {self._state.value}>"

    # -- the inboxes' side -------------------------------------------------------------
    def _attach(self, inbox: Inbox) -> None:
        with self._lock:
            if self._state is not _State.RUNNING:
                raise ClusterClosedError(f"dispatcher {self.name!r} is closed", cluster=inbox.cluster)
            self._inboxes.add(inbox)

    def _detach(self, inbox: Inbox) -> None:
        with self._lock:
            self._inboxes.discard(inbox)

    def _submit(self, inbox: Inbox) -> None:
        """Queue *inbox*, whose token the caller holds and hands over. Never blocks."""
        with self._lock:
            if self._state is _State.RUNNING:
                self._runq.put(inbox)
                return
        # Closed: every attached inbox was closed with it, so there is nothing to deliver,
        # only the discarding to do, which runs no user code and may run here.
        inbox._finish()

    def _work(self) -> None:
        mark_delivering()
        get = self._runq.get
        batch = self.batch
        while True:
            inbox = get()
            if inbox is None:
                return
            try:
                inbox._run(batch)
            except Exception:  # a bug of ours; keep the thread serving the others
                _log.exception("dispatcher %r: internal error while delivering to %r", self.name, inbox)
