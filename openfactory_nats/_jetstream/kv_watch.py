"""A running watch of the key-value store, for blocking code: an ordered push consumer
whose entries go to a callback or a queue, remade after a gap; and what it needs of the
blocking facade."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from .._errors import (
    ClusterClosedError,
    ClusterTimeoutError,
    JetStreamError,
    NatsClusterError,
    NoRespondersError,
    StreamNotFoundError,
    SubscriptionClosedError,
    SubscriptionModeError,
)
from .._message import Msg
from .._receive.dispatcher import Dispatcher
from .._receive.subscription import Subscription
from .._wire import check_timeout
from . import api, kv
from .kv import Entry, Step, WatchState

__all__ = ("Callback", "Nats", "Watch")

Callback = Callable[[Entry], object]
_TICK = 1.0  # how often a watch checks its consumer (heartbeats, reconnections) and its cluster


class Core(Protocol):
    @property
    def logger(self) -> logging.Logger: ...

    def counter(self, key: str) -> int: ...

    @property
    def drain_timeout(self) -> float: ...

    def check_open(self) -> None: ...


class Nats(Protocol):
    """What the key-value store needs of the blocking facade."""

    @property
    def name(self) -> str: ...

    @property
    def cluster(self) -> Core: ...

    def publish(self, subject: str, payload: bytes, timeout: float | None = None) -> None: ...

    def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Msg: ...

    def subscribe(
        self,
        subject: str,
        callback: Callable[[Msg], object] | None = None,
        *,
        dispatcher: Dispatcher | None = None,
        timeout: float | None = None,
    ) -> Subscription: ...


class Watch:
    """A running watch (``kv.watch(...)``); a context manager that stops on exit."""

    def __init__(
        self, nats: Nats, state: WatchState, callback: Callback | None, dispatcher: Dispatcher | None, wait: float
    ) -> None:
        self._nats = nats
        self._state = state
        self._callback = callback
        self._timeout = wait
        self._logger = nats.cluster.logger
        self._lock = threading.Lock()  # one reading or resetting at a time
        self._ready = threading.Condition(threading.Lock())
        self._entries: deque[Entry] = deque()
        self._caught = threading.Event()
        self._stopped = threading.Event()
        self._stale: list[str] = []  # consumers not deleted yet
        self._retired: list[Subscription] = []  # earlier consumers' subscriptions
        self._deliver = threading.Lock()  # held while an entry is handed over: one at a time, in order
        self._dispatcher = dispatcher
        self._sub: Subscription | None = None
        self._broken = False
        self._closed = False  # its cluster closed: nothing more will come
        self._pid = os.getpid()
        self.errors = 0
        self.resets = 0
        self._reconnects = nats.cluster.counter("reconnects")
        self._seen = time.monotonic()
        deadline = time.monotonic() + wait
        with self._lock:
            try:
                self._create(max(0.0, deadline - time.monotonic()))
            except BaseException:
                for sub in self._retired:
                    sub.unsubscribe()
                raise
        self._monitor = threading.Thread(target=self._watch_consumer, name=f"kv-watch-{state.bucket}", daemon=True)
        self._monitor.start()

    def __repr__(self) -> str:
        return f"<Watch bucket={self._state.bucket!r} keys={self._state.keys!r} revision={self._state.last}>"

    @property
    def caught_up(self) -> bool:
        """The current values (or history) have all been delivered."""
        return self._caught.is_set()

    @property
    def revision(self) -> int:
        """The last revision delivered (0 for none)."""
        return self._state.last

    def wait_caught_up(self, timeout: float | None = None) -> None:
        """Block until the current values (or history) have all been delivered (to the
        callback, which returned; or to the queue :meth:`next` reads).

        :raises ClusterTimeoutError: when that did not happen within *timeout* s.
        :raises SubscriptionClosedError: when the watch was stopped, or its cluster closed,
            before.
        """
        wait = self._timeout if timeout is None else check_timeout(timeout)
        self._check_process()
        deadline = time.monotonic() + wait
        with self._ready:
            while not self._caught.is_set():
                self._check_ended()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClusterTimeoutError(
                        f"watch {self._state.bucket}/{self._state.keys}: not caught up within {wait:g} s",
                        cluster=self._nats.name,
                    )
                self._ready.wait(left)

    def _check_process(self) -> None:
        """In a forked child nothing delivers: the consumer and its subscription are the parent's."""
        if self._pid != os.getpid():
            raise SubscriptionClosedError(
                f"watch {self._state.bucket}/{self._state.keys} was made by the parent process and does not "
                "deliver in a forked child; watch again in the child",
                cluster=self._nats.name,
            )

    def _check_ended(self) -> None:
        if self._stopped.is_set() or self._closed:
            why = "stopped" if self._stopped.is_set() else "ended: its cluster closed"
            raise SubscriptionClosedError(
                f"watch {self._state.bucket}/{self._state.keys} {why}", cluster=self._nats.name
            )

    def next(self, timeout: float | None = None) -> Entry:
        """The next entry.

        :raises ClusterTimeoutError: when none came within *timeout* s.
        :raises SubscriptionClosedError: after :meth:`stop` or the cluster's close, once
            none is left; in a forked child.
        :raises SubscriptionModeError: for a watch with a callback.
        """
        if self._callback is not None:
            raise SubscriptionModeError("next() on a watch with a callback")
        wait = self._timeout if timeout is None else check_timeout(timeout)
        self._check_process()
        deadline = time.monotonic() + wait
        with self._ready:
            while not self._entries:
                self._check_ended()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClusterTimeoutError(
                        f"watch {self._state.bucket}/{self._state.keys}: no entry within {wait:g} s",
                        cluster=self._nats.name,
                    )
                self._ready.wait(left)
            return self._entries.popleft()

    def __iter__(self) -> Iterator[Entry]:
        """Entries as they come, until :meth:`stop` or the cluster's close."""
        while True:
            try:
                yield self.next(3600.0)
            except ClusterTimeoutError:
                continue
            except SubscriptionClosedError:
                return

    def _drain(self) -> list[Entry]:
        with self._ready:
            got = list(self._entries)
            self._entries.clear()
        return got

    # -- the ordered consumer ----------------------------------------------------------
    def _on_msg(self, msg: Msg) -> None:
        """On a subscription's worker thread, one message at a time."""
        entry: Entry | None = None
        with self._lock:
            if self._stopped.is_set():
                return
            step, value = self._state.read(msg)
            if step is Step.IGNORE:
                return
            self._seen = time.monotonic()
            if step is Step.FLOW:
                try:
                    self._nats.publish(value, b"")
                except NatsClusterError as exc:
                    self._logger.debug("watch %s: flow control not answered: %s", self._state.bucket, exc)
            elif step is Step.RESET:
                self._reset()
            elif step is Step.DELIVER:
                entry = value
            caught = self._state.caught_up
            # Taken before the read lock is let go: after a reset the next consumer's
            # subscription (another thread) waits for this entry to be handed over.
            self._deliver.acquire()
        try:
            if entry is not None:
                if self._callback is None:
                    with self._ready:
                        self._entries.append(entry)
                        self._ready.notify_all()
                else:
                    try:
                        self._callback(entry)
                    except Exception:
                        self.errors += 1
                        self._logger.exception("watch %s: callback failed on %r", self._state.bucket, entry.key)
            if caught and not self._caught.is_set():
                self._set_caught()
        finally:
            self._deliver.release()

    def _create(self, wait: float) -> None:
        """Under the lock: subscribe to a new inbox, then make a consumer delivering to it."""
        deadline = time.monotonic() + wait
        subject, payload = self._state.next_consumer()
        sub = self._nats.subscribe(self._state.inbox, self._on_msg, dispatcher=self._dispatcher, timeout=wait)
        try:
            reply = self._nats.request(subject, payload, max(0.0, deadline - time.monotonic()))
            body = api.parse_reply(reply.data, self._nats.name, "watch")
        except BaseException as exc:
            self._retired.append(sub)
            if not isinstance(exc, JetStreamError):
                self._stale.append(self._state.consumer)  # it may exist all the same
            if isinstance(exc, NoRespondersError):
                raise JetStreamError(f"watch {self._state.bucket}: no JetStream answered", code=503) from None
            if isinstance(exc, StreamNotFoundError):
                raise kv.not_found(self._state.bucket, self._nats.name, exc) from None
            raise
        if self._stopped.is_set():  # stop() ran meanwhile and did not see these: undo them
            sub.unsubscribe(min(wait, 2.0))
            self._delete(self._state.consumer, min(wait, 2.0))
            return
        if self._sub is not None:
            self._retired.append(self._sub)
        self._sub = sub
        self._broken = False
        if self._state.created(body):
            self._set_caught()

    def _set_caught(self) -> None:
        with self._ready:
            self._caught.set()
            self._ready.notify_all()

    def _reset(self) -> None:
        """Under the lock: make the consumer again after the last revision delivered."""
        self.resets += 1
        self._stale.append(self._state.consumer)
        self._logger.debug("watch %s: resuming after revision %d", self._state.bucket, self._state.last)
        try:
            self._create(min(self._timeout, 5.0))
        except NatsClusterError as exc:
            self._broken = True
            self._logger.debug("watch %s: consumer not made yet (%s); retrying", self._state.bucket, exc)
        self._seen = time.monotonic()

    def _watch_consumer(self) -> None:
        """A thread: make the consumer again after a reconnection, or when heartbeats
        stopped; delete the consumers left behind."""
        closing_since: float | None = None
        while not self._stopped.wait(_TICK):
            core = self._nats.cluster
            try:
                core.check_open()
            except ClusterClosedError:  # its subscriptions are closed with it: end the readers
                # once the close's drain has delivered what was in flight (bounded: a
                # drain ends within drain_timeout, what is left is discarded and counted)
                closing_since = time.monotonic() if closing_since is None else closing_since
                sub = self._sub
                delivering = sub is not None and sub.delivering
                if delivering and time.monotonic() - closing_since < core.drain_timeout + 5:
                    continue
                with self._ready:
                    self._closed = True
                    self._ready.notify_all()
                return
            reconnects = core.counter("reconnects")
            with self._lock:
                if self._stopped.is_set():
                    return
                if self._broken or reconnects != self._reconnects or time.monotonic() - self._seen > 3 * kv.HEARTBEAT:
                    self._reconnects = reconnects
                    self._reset()
                stale, self._stale = self._stale, []
                retired, self._retired = self._retired, []
            for sub in retired:
                sub.unsubscribe(2.0)
            for consumer in stale:
                if not self._delete(consumer, 2.0):
                    with self._lock:
                        self._stale.append(consumer)

    def _delete(self, consumer: str, wait: float) -> bool:
        try:
            self._nats.request(f"{api.API}CONSUMER.DELETE.{self._state_stream}.{consumer}", b"", wait)
        except NatsClusterError:
            return False
        return True

    @property
    def _state_stream(self) -> str:
        return kv.stream_name(self._state.bucket)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the watch: no callback starts after this returns (one running finishes
        unless called from it); :meth:`next` raises once the queue is empty. Idempotent;
        within *timeout*. In a forked child it does nothing: the consumer is the parent's."""
        wait = self._timeout if timeout is None else check_timeout(timeout)
        if self._stopped.is_set() or self._pid != os.getpid():
            return
        deadline = time.monotonic() + wait
        self._stopped.set()
        with self._ready:
            self._ready.notify_all()
        if threading.current_thread() is not self._monitor:
            self._monitor.join(wait)
        # Not under the lock: a callback calling stop() may hold the delivery lock.
        subs, self._retired = [*self._retired, *([self._sub] if self._sub else [])], []
        stale, self._stale = [*self._stale, self._state.consumer], []
        for sub in subs:
            sub.unsubscribe(max(0.0, deadline - time.monotonic()))
        for consumer in stale:  # those left past the deadline, the server deletes after 5 min unused
            if (left := deadline - time.monotonic()) <= 0:
                break
            self._delete(consumer, min(left, 2.0))

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
