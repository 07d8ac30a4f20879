"""Subscriptions as users hold them: :class:`Subscription` for threads, and
:class:`AsyncSubscription` for asyncio code.

A :class:`Subscription` joins a thread-side :class:`~openfactory_nats._receive.inbox.Inbox`
(where messages wait for a callback worker or a reader) and a loop-side
:class:`~openfactory_nats._receive.receivers.Receiver` (the nats-py subscription). Its own state
is the inbox's: once the inbox is closed, the subscription is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from types import TracebackType
from typing import Protocol

from .. import _tracing
from .._errors import (
    ClusterTimeoutError,
    ClusterUnavailableError,
    InvalidMessageError,
    InvalidTypeError,
    NatsClusterError,
)
from .._filters import check_sub_line, validate_filter, validate_queue
from .._message import Msg
from .._stats import Tally
from .._wire import check_timeout
from .dispatcher import Dispatcher
from .inbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_MSGS, DROP_REPORT_INTERVAL, Inbox, SubscriptionClosedError
from .receivers import Receiver
from .serving import SPREAD_AFTER, Workers

__all__ = ("AsyncSubscription", "Core", "Facade", "Owner", "Subscription", "open_subscription")


class Owner(Protocol):
    """Where a subscription's receiver is attached: the receive side of the asyncio core."""

    @property
    def name(self) -> str: ...

    @property
    def logger(self) -> logging.Logger: ...

    async def remove_receiver(self, receiver: Receiver, drain: bool, timeout: float = 5.0) -> bool: ...


class Core(Protocol):
    """The asyncio core (:class:`~openfactory_nats.NatsCluster`), as a blocking
    subscription sees it."""

    @property
    def name(self) -> str: ...

    @property
    def logger(self) -> logging.Logger: ...

    def check_open(self) -> None: ...

    def respond(self, reply: str, data: bytes, headers: Mapping[str, str] | None) -> None: ...


class Facade(Protocol):
    """The blocking facade a :class:`Subscription` was made on
    (:class:`~openfactory_nats.SyncNatsCluster`): it runs the core's calls on its loop."""

    @property
    def cluster(self) -> Core: ...

    def thread_check(self) -> Callable[[], None]: ...

    def _check_thread(self) -> None: ...

    def _add(self, receiver: Receiver, wait: float) -> None: ...

    def _remove(self, receiver: Receiver, drain: bool, timeout: float) -> bool: ...


class Subscription:
    """A subscription made with :meth:`SyncNatsCluster.subscribe`.

    With a callback, messages reach it on a worker thread, in order, one at a time.
    Without one, read them with :meth:`next_msg` or by iterating (the iteration ends once
    the subscription is unsubscribed, drained or its cluster closed). As a context
    manager it unsubscribes on exit.
    """

    def __init__(
        self,
        name: str,
        parts: list[tuple[Facade, Receiver]],
        inbox: Inbox,
        timeout: float,
        workers: Workers | None = None,
    ) -> None:
        self._name = name
        self._parts = parts
        self._inbox = inbox
        self._timeout = timeout
        self._pid = os.getpid()
        #: Threads that read this subscription (``serve``): joined when it ends.
        self._threads: tuple[threading.Thread, ...] = (
            () if workers is None else tuple(workers.start(self.__iter__, inbox.subject, parts[0][1].queue))
        )

    def __repr__(self) -> str:
        return f"<Subscription {self.subject!r} queue={self.queue!r} on {self._name!r}>"

    @property
    def subject(self) -> str:
        """The subject filter."""
        return self._inbox.subject

    @property
    def queue(self) -> str | None:
        """The queue group, or None."""
        return self._parts[0][1].queue

    @property
    def pending(self) -> int:
        """Messages waiting for the callback or a reader."""
        return self._inbox.pending

    @property
    def delivered(self) -> int:
        """Messages handed to the callback or a reader."""
        return self._inbox.delivered

    @property
    def dropped(self) -> int:
        """Messages dropped because the subscription's limits were full (a slow consumer)."""
        return self._inbox.dropped

    @property
    def errors(self) -> int:
        """Exceptions raised by the callback (each logged at ERROR)."""
        return self._inbox.errors

    @property
    def discarded(self) -> int:
        """Messages thrown away because the subscription ended first: pending at
        ``unsubscribe()``, at the end of a drain that ran out of time, or late (logged once)."""
        return self._inbox.discarded

    @property
    def workers(self) -> tuple[threading.Thread, ...]:
        """The threads answering this subscription's requests (``serve``'s; joined when it ends)."""
        return self._threads

    @property
    def delivering(self) -> bool:
        """True while messages are or may still be delivered (a drain: until its end)."""
        return not self._inbox.ended

    @property
    def is_open(self) -> bool:
        """True until unsubscribed, drained or closed with its cluster."""
        return not self._inbox.closed and self._pid == os.getpid()

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            raise SubscriptionClosedError(
                f"cluster {self._name!r}: subscription {self.subject!r} was made by the parent "
                "process and does not deliver in a forked child; subscribe again in the child",
                cluster=self._name,
                subject=self.subject,
            )

    def next_msg(self, timeout: float | None = None) -> Msg:
        """The next message, waiting up to *timeout* s (None: the cluster's default).

        :raises ClusterTimeoutError: (a ``TimeoutError``) when none came in time.
        :raises SubscriptionClosedError: once the subscription is closed and nothing is
            left to read (a ``ClusterClosedError``).
        :raises SubscriptionModeError: when the subscription has a callback.
        :raises WrongThreadError: on the event-loop thread.
        """
        self._check_process()
        return self._inbox.next_msg(self._timeout if timeout is None else timeout)

    def __iter__(self) -> Iterator[Msg]:
        self._check_process()
        return iter(self._inbox)

    def unsubscribe(self, timeout: float | None = None) -> None:
        """Stop delivery at once; messages still pending are discarded. Idempotent; safe
        from the subscription's own callback.

        :raises WrongThreadError: on the event-loop thread.
        """
        if self._pid != os.getpid():
            return
        wait = self._timeout if timeout is None else check_timeout(timeout)
        self._parts[0][0]._check_thread()
        deadline = time.monotonic() + wait
        self._inbox.close(drain=False, timeout=wait)
        for owner, receiver in self._parts:
            owner._remove(receiver, drain=False, timeout=max(0.0, deadline - time.monotonic()))
        self._join(deadline)

    def _join(self, deadline: float) -> None:
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def drain(self, timeout: float | None = None) -> None:
        """Stop receiving, and let what the server already sent be processed, for up to
        *timeout* s; then what is left is discarded (counted in :attr:`discarded`). During
        a reconnection, the reconnection is waited for within *timeout* s first.

        :raises ClusterTimeoutError: when the pending messages were not processed in time.
        :raises ClusterUnavailableError: when the connection was lost and not back within
            *timeout* s (the subscription ends all the same).
        """
        if self._pid != os.getpid():
            return
        wait = self._timeout if timeout is None else check_timeout(timeout)
        self._parts[0][0]._check_thread()
        deadline = time.monotonic() + wait
        drained = True
        lost: ClusterUnavailableError | None = None
        try:
            for owner, receiver in self._parts:
                try:
                    if not owner._remove(receiver, drain=True, timeout=max(0.0, deadline - time.monotonic())):
                        drained = False
                except ClusterUnavailableError as exc:  # removed all the same; the others go on
                    lost = lost or exc
            if lost is not None:
                raise lost
        finally:  # whatever happened, the subscription ends here
            if not self._inbox.close(drain=True, timeout=max(0.0, deadline - time.monotonic())):
                drained = drained and self._inbox.in_callback  # from its own callback: it goes on after
            self._join(deadline)
        if not drained:
            raise ClusterTimeoutError(
                f"cluster {self._name!r}: subscription {self.subject!r} not drained within {wait:g} s",
                cluster=self._name,
            )

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unsubscribe()


def open_subscription(
    clusters: list[Facade],
    name: str,
    subject: str,
    callback: Callable[[Msg], object] | None,
    *,
    queue: str | None,
    timeout: float,
    max_pending_msgs: int = DEFAULT_MAX_MSGS,
    max_pending_bytes: int = DEFAULT_MAX_BYTES,
    dispatcher: Dispatcher | None = None,
    workers: Workers | None = None,
) -> Subscription:
    """Subscribe on every one of *clusters*, delivering into one inbox (see
    :meth:`SyncNatsCluster.subscribe`); validation happens in the caller's thread. With
    *workers* (``serve``), the subscription starts the threads that answer its requests
    once the server has registered it, and owns them."""
    filt = validate_filter(subject)
    group = validate_queue(queue)
    check_sub_line(filt, group)
    first = clusters[0]
    first._check_thread()
    for cluster in clusters:  # before any thread is started for the subscription
        cluster.cluster.check_open()
    inbox = Inbox(
        name,
        filt,
        first.cluster.logger,
        callback=callback,
        dispatcher=dispatcher,
        max_msgs=max_pending_msgs,
        max_bytes=max_pending_bytes,
        check_thread=first.thread_check(),
        queue=group,
    )
    if workers is not None:
        inbox.wake_lazily(SPREAD_AFTER)  # before the first request can come in
    # The receivers reach the core only: a cluster nobody holds any more can be collected.
    parts = [(cluster, Receiver(filt, group, inbox, cluster.cluster.respond)) for cluster in clusters]
    deadline = time.monotonic() + timeout
    done: list[tuple[Facade, Receiver]] = []
    try:
        for cluster, receiver in parts:
            cluster._add(receiver, max(0.0, deadline - time.monotonic()))
            done.append((cluster, receiver))
    except BaseException:
        inbox.close(drain=False, timeout=1.0 if not inbox.in_callback else 0.0)  # joins its thread
        for cluster, receiver in done:
            with contextlib.suppress(NatsClusterError):
                cluster._remove(receiver, drain=False, timeout=1.0)
        raise
    return Subscription(name, parts, inbox, timeout, workers)


AsyncCallback = Callable[[Msg], Awaitable[object]]


class AsyncSubscription:
    """A subscription made with :meth:`NatsCluster.subscribe`, for asyncio code.

    With an ``async`` callback, it is awaited for each message in order on the event
    loop (a task per subscription); without one, read with :meth:`next_msg` or
    ``async for``. Messages beyond the limits are dropped, counted and reported.
    """

    def __init__(
        self,
        owner: Owner,
        subject: str,
        callback: AsyncCallback | None,
        max_msgs: int,
        max_bytes: int,
    ) -> None:
        if callback is not None and not callable(callback):
            raise InvalidTypeError(f"callback must be an async function, not {type(callback).__name__}")
        for name, value in (("max_pending_msgs", max_msgs), ("max_pending_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidTypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 1:
                raise InvalidMessageError(f"{name} must be at least 1, not {value}")
        self._owner = owner
        self.cluster = owner.name
        self.subject = subject
        self._logger: logging.Logger = owner.logger
        self._callback = callback
        self._max_msgs = max_msgs
        self._max_bytes = max_bytes
        self._items: deque[Msg] = deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._next_report = 0.0
        self.receiver: Receiver | None = None
        self.delivered = 0
        self.dropped = 0
        self.errors = 0
        #: Messages thrown away because the subscription ended first (logged once).
        self.discarded = 0
        self._tallies: tuple[Tally, ...] = ()

    @property
    def pending(self) -> int:
        """Messages waiting."""
        return len(self._items)

    def count_into(self, tally: Tally) -> None:
        """(The sink protocol) Add what is dropped, discarded or raised from now on to
        *tally* (the cluster's)."""
        self._tallies = (*self._tallies, tally)

    def _tell(self, *, dropped: int = 0, errors: int = 0, discarded: int = 0) -> None:
        for tally in self._tallies:
            tally.add(dropped=dropped, errors=errors, discarded=discarded)

    def offer(self, batch: list[Msg]) -> None:
        """(The receiver, on the loop.) Queue what fits; never waits."""
        if self._closed:
            self.discarded += len(batch)
            self._tell(discarded=len(batch))
            return
        dropped = 0
        for msg in batch:
            if len(self._items) < self._max_msgs and self._bytes + msg.size <= self._max_bytes:
                self._items.append(msg)
                self._bytes += msg.size
            else:
                dropped += 1
        if dropped:
            self.dropped += dropped
            self._tell(dropped=dropped)
            now = time.monotonic()
            if now >= self._next_report:
                self._next_report = now + DROP_REPORT_INTERVAL
                self._logger.warning(
                    "cluster %r: subscription %r is too slow: %d message(s) dropped (%d in all)",
                    self.cluster,
                    self.subject,
                    dropped,
                    self.dropped,
                )
        self._wake.set()
        if self._callback is not None and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._deliver())

    def _pop(self) -> Msg:
        msg = self._items.popleft()
        self._bytes -= msg.size
        self.delivered += 1
        return msg

    async def _deliver(self) -> None:
        callback = self._callback
        assert callback is not None
        if (hook := _tracing.HOOK) is not None:  # read once: uninstrument() may clear it
            queue = self.receiver.queue if self.receiver is not None else None
            callback = hook.consumer_async(callback, self.subject, queue)
        while self._items:
            msg = self._pop()
            try:
                await callback(msg)
            except Exception:
                self.errors += 1
                self._tell(errors=1)
                self._logger.exception(
                    "cluster %r: the callback of subscription %r raised; delivery goes on", self.cluster, self.subject
                )

    async def next_msg(self, timeout: float | None = 1.0) -> Msg:
        """The next message, waiting up to *timeout* s (None: no limit).

        :raises ClusterTimeoutError: when none came in time.
        :raises SubscriptionClosedError: once closed and empty.
        """
        limit = None if timeout is None else check_timeout(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        while not self._items:
            if self._closed:
                raise SubscriptionClosedError(
                    f"cluster {self.cluster!r}: subscription {self.subject!r} is closed",
                    cluster=self.cluster,
                    subject=self.subject,
                )
            self._wake.clear()
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise ClusterTimeoutError(
                    f"cluster {self.cluster!r}: no message on {self.subject!r} within {limit:g} s",
                    cluster=self.cluster,
                )
            woken = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({woken}, timeout=remaining)
            finally:
                woken.cancel()  # leave no waiting task behind
        return self._pop()

    def __aiter__(self) -> AsyncIterator[Msg]:
        return self

    async def __anext__(self) -> Msg:
        try:
            return await self.next_msg(None)
        except SubscriptionClosedError:
            raise StopAsyncIteration from None

    async def unsubscribe(self) -> None:
        """Stop delivery at once; what is pending is discarded."""
        self.close(drain=False)
        if self.receiver is not None:
            await self._owner.remove_receiver(self.receiver, drain=False)

    async def drain(self) -> None:
        """Stop receiving; what the server already sent stays readable (or is handed to
        the callback). During a reconnection, the reconnection is waited for first.

        :raises ClusterUnavailableError: when the connection was lost and not back within
            5 s (the subscription ends all the same).
        """
        try:
            if self.receiver is not None:
                await self._owner.remove_receiver(self.receiver, drain=True)
        finally:
            self.close(drain=True)

    def close(self, drain: bool = True, timeout: float = 0.0) -> bool:
        """Stop accepting messages; without *drain* discard what is pending."""
        self._closed = True
        if not drain and self._items:
            count = len(self._items)
            self._items.clear()
            self._bytes = 0
            self.discarded += count
            self._tell(discarded=count)
            self._logger.info(
                "cluster %r: subscription %r: %d received message(s) discarded, still pending when it was closed",
                self.cluster,
                self.subject,
                count,
            )
        self._wake.set()
        return True
