"""The hand-off of received messages from the event loop to user code, bounded.

One :class:`Inbox` per subscription. The event-loop thread calls :meth:`Inbox.offer`
with a batch of messages; user code takes them in one of three ways, chosen at creation:

* **pull** (no callback): :meth:`Inbox.next_msg` or iteration, on any thread;
* **own thread** (a callback, no dispatcher): a daemon thread named
  ``openfactory-nats-<cluster>-<subject>`` calls the callback, message after message;
* **shared dispatcher** (a callback and a :class:`~openfactory_nats._receive.dispatcher.Dispatcher`):
  a pool of threads serves many subscriptions, each still in order and one message at a
  time (the own-thread case is a private one-thread dispatcher).

The loop thread must never wait for user code. :meth:`Inbox.offer` takes only a short
internal lock that is never held while user code runs or while anyone waits, appends to a
``deque`` and wakes the consumer once per batch (an ``Event`` in pull mode, the
dispatcher's run queue otherwise). What does not fit the limits is dropped and counted,
and reported (see :mod:`.limits`).

Who may take messages out: in pull mode, a reader holding the short lock; with a
callback, only the worker holding the inbox's dispatcher token (see :mod:`.dispatcher`), so
that worker needs no lock per message. Counters have one writer each, or are written
under the lock, so none is lost to a race.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from operator import attrgetter
from types import TracebackType

from .. import _tracing
from .._errors import (
    ClusterTimeoutError,
    InvalidMessageError,
    InvalidTypeError,
    SubscriptionClosedError,
    SubscriptionModeError,
)
from .._forksafe import renew_after_fork
from .._message import Msg
from .._stats import Tally
from .._wire import check_timeout
from .dispatcher import Dispatcher
from .limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_MSGS, DROP_REPORT_INTERVAL, Losses, append_what_fits, check_limit
from .readers import Readers

__all__ = (
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_MSGS",
    "DROP_REPORT_INTERVAL",
    "Inbox",
    "SubscriptionClosedError",
    "SubscriptionModeError",
)

_size_of: Callable[[Msg], int] = attrgetter("_size")
#: Messages the private thread of a subscription delivers between two looks at its queue.
_OWN_THREAD_BATCH = 4096


class _State(enum.Enum):
    OPEN = "open"  # accepting messages
    DRAINING = "draining"  # refusing new messages, delivering what is pending
    CLOSED = "closed"  # refusing new messages; pending ones discarded or being discarded


_OPEN, _DRAINING, _CLOSED = _State.OPEN, _State.DRAINING, _State.CLOSED


class Inbox:
    """The messages of one subscription on their way from the event loop to user code.

    :param cluster: the cluster's name, for thread names, log lines and errors.
    :param subject: the subscription's subject filter, likewise.
    :param logger: where dropped messages (WARNING) and callback errors (ERROR) go.
    :param callback: called with each :class:`Msg`, on a worker thread; ``None`` to read
        with :meth:`next_msg` or by iterating.
    :param dispatcher: the shared threads that run *callback*; by default the subscription
        gets a thread of its own.
    :param max_msgs: the most messages waiting; more are dropped.
    :param max_bytes: the most bytes waiting (as counted by :attr:`Msg.size`); more are dropped.
    :param check_thread: called first by the methods that may block; it should raise
        (e.g. :class:`WrongThreadError` on the event-loop thread) where blocking would
        deadlock.
    :param queue: the subscription's queue group, if any (for tracing).
    :raises InvalidTypeError, InvalidMessageError: for a bad limit, or a dispatcher
        without a callback.
    :raises ClusterClosedError: when *dispatcher* is closed.
    """

    def __init__(
        self,
        cluster: str,
        subject: str,
        logger: logging.Logger,
        *,
        callback: Callable[[Msg], object] | None = None,
        dispatcher: Dispatcher | None = None,
        max_msgs: int = DEFAULT_MAX_MSGS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        check_thread: Callable[[], object] | None = None,
        queue: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.subject = subject
        self.queue = queue
        self.max_msgs = check_limit("max_msgs", max_msgs)
        self.max_bytes = check_limit("max_bytes", max_bytes)
        if callback is not None and not callable(callback):
            raise InvalidTypeError(f"callback must be callable, not {type(callback).__name__}")
        if dispatcher is not None and callback is None:
            raise InvalidMessageError("a dispatcher runs callbacks: give a callback too")
        if dispatcher is not None and not isinstance(dispatcher, Dispatcher):
            raise InvalidTypeError(f"dispatcher must be a Dispatcher, not {type(dispatcher).__name__}")
        self._logger = logger
        self._callback = callback
        self._check_thread = check_thread
        self._state = _OPEN
        self._items: deque[Msg] = deque()
        self._lock = threading.Lock()  # short: state changes, offers, pull reads; never held while waiting
        self._readers = Readers(self._lock, self._items)  # pull mode: those waiting, and their waking
        self._done = threading.Event()  # set once nothing is or will be delivered any more
        self._token = threading.Lock()  # callback modes: held while queued on or run by a worker
        # Counters; the comment says who writes each.
        self._in_bytes = 0  # offer, under the lock
        self._out_bytes = 0  # the reader (under the lock) or the token holder
        self._delivered = 0  # likewise
        self._losses = Losses(cluster, subject, logger, self.max_msgs, self.max_bytes)  # and their counters
        self._owns_dispatcher = callback is not None and dispatcher is None
        if self._owns_dispatcher:
            dispatcher = Dispatcher(1, name=f"openfactory-nats-{cluster}-{subject}", batch=_OWN_THREAD_BATCH)
        self._dispatcher = dispatcher
        if dispatcher is not None:
            dispatcher._attach(self)
        renew_after_fork(self)

    def _renew_after_fork(self) -> None:
        # The loop thread (offering) or a reader may have held the lock at the fork: a
        # child closing its inherited subscriptions would wait for it forever. The token
        # is only ever tried, never waited for.
        self._lock = threading.Lock()
        self._readers.renew(self._lock)
        done = threading.Event()
        if self._done.is_set():
            done.set()
        self._done = done

    # -- counters ----------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Messages waiting to be delivered (not counting one in a callback right now)."""
        return len(self._items)

    @property
    def pending_bytes(self) -> int:
        """Bytes waiting to be delivered, as counted by :attr:`Msg.size`."""
        return max(0, self._in_bytes - self._out_bytes)

    @property
    def delivered(self) -> int:
        """Messages handed to the callback or returned to a reader."""
        return self._delivered

    @property
    def dropped(self) -> int:
        """Messages dropped because the limits were reached (the consumer was too slow)."""
        return self._losses.dropped

    @property
    def discarded(self) -> int:
        """Messages thrown away because the subscription was closed."""
        return self._losses.discarded + self._losses.refused

    @property
    def errors(self) -> int:
        """Callback calls that raised."""
        return self._losses.errors

    def count_into(self, tally: Tally) -> None:
        """Add what this inbox drops, discards or sees raised from now on to *tally*
        (its cluster's): the totals of ``stats()`` outlive the subscription."""
        with self._lock:
            self._losses.tallies = (*self._losses.tallies, tally)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called (messages may still be delivered while draining)."""
        return self._state is not _OPEN

    @property
    def ended(self) -> bool:
        """True once nothing is or will be delivered any more (after a drain, its end)."""
        return self._done.is_set()

    @property
    def in_callback(self) -> bool:
        """True on a thread that delivers this inbox's messages (its callback's thread)."""
        return self._dispatcher is not None and self._dispatcher.is_worker()

    # -- the event-loop side -----------------------------------------------------------
    def offer(self, batch: list[Msg]) -> None:
        """Queue what fits of *batch* and wake the consumer once. Never blocks.

        Called from the event-loop thread. Messages beyond the limits are dropped and
        counted; after :meth:`close` the whole batch is refused (counted as discarded).
        """
        items = self._items
        with self._lock:
            if self._state is not _OPEN:
                self._losses.refused += len(batch)
                self._losses.tell(discarded=len(batch))
                return
            size = sum(map(_size_of, batch))
            if len(items) + len(batch) <= self.max_msgs and self._in_bytes - self._out_bytes + size <= self.max_bytes:
                items.extend(batch)
                self._in_bytes += size
                dropped = 0
            else:
                free = self.max_bytes - (self._in_bytes - self._out_bytes)
                taken, dropped = append_what_fits(items, batch, self.max_msgs - len(items), free)
                self._in_bytes += taken
                self._losses.dropped += dropped
                self._losses.tell(dropped=dropped)
            if self._callback is None and items and self._readers.idle:
                self._readers.wake(len(batch))
        if dropped:
            self._losses.note_drops(self._lock)
        if not items or self._callback is None:
            return
        if self._token.acquire(False):
            assert self._dispatcher is not None
            self._dispatcher._submit(self)

    def wake_lazily(self, after: float) -> None:
        """Pull mode, for readers that are workers of one job (``serve``): an offer wakes
        one waiting reader, and more only when messages still wait *after* seconds later.
        When one reader keeps up, the others sleep on, instead of each waking (and taking
        the interpreter lock from the others) for a message that is gone already."""
        self._readers.spread = check_timeout(after, "after")

    # -- pull mode ---------------------------------------------------------------------
    def next_msg(self, timeout: float | None = 1.0) -> Msg:
        """Return the next message, waiting up to *timeout* seconds (``None``: no limit).

        After :meth:`close` the messages still pending are returned (all of them after
        ``close(drain=True)``, none after ``close(drain=False)``), then it raises.

        :raises ClusterTimeoutError: (a ``TimeoutError``) when no message came in time.
        :raises SubscriptionClosedError: when the subscription is closed and empty.
        :raises SubscriptionModeError: when the subscription has a callback.
        """
        if self._callback is not None:
            raise SubscriptionModeError(
                f"subscription {self.subject!r} has a callback; next_msg and iteration are for "
                "subscriptions without one",
                cluster=self.cluster,
            )
        if self._check_thread is not None:
            self._check_thread()
        limit = None if timeout is None else check_timeout(timeout)
        items = self._items
        readers = self._readers
        deadline = None if limit is None else time.monotonic() + limit
        with self._lock:
            while True:
                if items:
                    return self._take()
                if self._state is not _OPEN:
                    self._done.set()
                    raise SubscriptionClosedError(
                        f"cluster {self.cluster!r}: subscription {self.subject!r} is closed",
                        cluster=self.cluster,
                        subject=self.subject,
                    )
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ClusterTimeoutError(
                        f"cluster {self.cluster!r}: no message on {self.subject!r} within {limit:g} s",
                        cluster=self.cluster,
                    )
                readers.idle += 1
                try:
                    readers.readable.wait(remaining)
                finally:
                    readers.idle -= 1

    def _take(self) -> Msg:
        """Pop the oldest message; the caller holds the lock and has seen one waiting."""
        msg = self._items.popleft()
        self._out_bytes += msg._size
        self._delivered += 1
        return msg

    def __iter__(self) -> Iterator[Msg]:
        return self

    def __next__(self) -> Msg:
        """The next message, waiting as long as it takes; the iteration ends once the
        subscription is closed and empty."""
        try:
            return self.next_msg(None)
        except SubscriptionClosedError:
            raise StopIteration from None

    # -- callback modes: run by a dispatcher worker holding the token -------------------
    def _run(self, budget: int) -> None:
        """Deliver up to *budget* messages to the callback, then hand the token on."""
        items = self._items
        pop = items.popleft
        callback = self._callback
        assert callback is not None and self._dispatcher is not None
        if (hook := _tracing.HOOK) is not None:  # read once: uninstrument() may clear it
            callback = hook.consumer(callback, self.subject, self.queue)
        count = 0
        while count < budget and self._state is not _CLOSED:
            try:
                msg = pop()
            except IndexError:
                break
            count += 1
            self._out_bytes += msg._size
            self._delivered += 1
            try:
                callback(msg)
            except BaseException:  # SystemExit too: it would end a shared worker silently
                self._losses.errors += 1
                self._losses.tell(errors=1)
                self._logger.exception(
                    "cluster %r: the callback of subscription %r raised on a message to %r; delivery goes on",
                    self.cluster,
                    self.subject,
                    msg.subject,
                )
        state = self._state
        if state is _CLOSED or (state is _DRAINING and not items):
            self._finish()
        elif items:
            self._dispatcher._submit(self)  # more to do: to the back of the queue, for fairness
        else:
            self._token.release()
            # An offer or a close that found the token held relies on this second look.
            if (items or self._state is not _OPEN) and self._token.acquire(False):
                self._dispatcher._submit(self)

    def _finish(self) -> None:
        """Discard what is left and mark the inbox done. The caller holds the token (or,
        in pull mode, nothing runs anyway); it keeps it, so the inbox is never queued again."""
        with self._lock:
            self._state = _CLOSED
            self._discard_pending()
        self._losses.report_drops(self._lock)
        self._losses.report_discards(self._lock)
        dispatcher = self._dispatcher
        if dispatcher is not None:
            dispatcher._detach(self)
            if self._owns_dispatcher:
                dispatcher.close(timeout=0)  # its thread ends when this returns; close() joins it
        self._done.set()

    def _discard_pending(self) -> None:
        """Drop every pending message as discarded; the caller holds the lock (and the
        token, in the callback modes)."""
        items = self._items
        count = len(items)
        while items:
            self._out_bytes += items.popleft()._size
        self._losses.discarded += count
        if count:
            self._losses.tell(discarded=count)

    # -- closing -----------------------------------------------------------------------
    def _begin_close(self, drain: bool) -> None:
        """Stop accepting messages; with *drain*, deliver what is pending first. Never waits."""
        with self._lock:
            if self._state is _CLOSED or (drain and self._state is _DRAINING):
                return
            self._state = _DRAINING if drain else _CLOSED
            if self._callback is None:
                if not drain:
                    self._discard_pending()
                if not drain or not self._items:
                    self._done.set()
                self._readers.readable.notify_all()  # readers waiting see the close
        if self._callback is None:
            self._losses.report_drops(self._lock)
            self._losses.report_discards(self._lock)
        elif self._token.acquire(False):
            assert self._dispatcher is not None
            # Idle: nobody would look at the inbox again, so finish it or queue it to drain.
            if drain and self._items:
                self._dispatcher._submit(self)
            else:
                self._finish()

    def close(self, drain: bool = False, timeout: float = 5.0) -> bool:
        """Stop accepting messages and end delivery. Idempotent and thread-safe; a later
        ``close(drain=False)`` cuts a drain short.

        With a callback, *drain* lets the pending messages be delivered, for up to
        *timeout* seconds, after which the rest is discarded; without *drain* they are
        discarded at once, and the callback call in progress (if any) is waited for.
        The subscription's own thread is joined.

        ``close`` does not wait when *timeout* is 0 (what the event-loop thread must pass)
        or when called from a callback running on the same dispatcher (its own callback
        included): delivery then ends after the callback in progress returns, and a drain
        goes on in the background until nothing is pending (a later ``close(drain=False)``
        cuts it short).

        Without a callback nothing is waited for: after ``drain=True`` the pending
        messages stay readable, then readers get :class:`SubscriptionClosedError`.

        :returns: True when delivery had ended (and the own thread with it) within *timeout*.
        :raises: what *check_thread* raises, before anything changes, when ``close`` would wait.
        """
        limit = check_timeout(timeout)
        dispatcher = self._dispatcher
        waits = dispatcher is not None and limit > 0 and not dispatcher.is_worker()
        if waits and self._check_thread is not None:
            self._check_thread()
        deadline = time.monotonic() + limit
        self._begin_close(drain)
        if dispatcher is None:
            return True
        if not waits:
            return self._done.is_set()
        if not self._done.wait(limit):
            if drain:
                with self._lock:
                    self._losses.cut = self._state is _DRAINING
                self._begin_close(drain=False)  # out of time: discard the rest
            return False
        if self._owns_dispatcher:
            return dispatcher.close(max(0.0, deadline - time.monotonic()))
        return True

    def __enter__(self) -> Inbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "pull" if self._callback is None else "own thread" if self._owns_dispatcher else "dispatcher"
        return (
            f"<Inbox cluster={self.cluster!r} subject={self.subject!r} {mode} {self._state.value} "
            f"pending={len(self._items)}>"
        )
