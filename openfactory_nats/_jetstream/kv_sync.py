"""The key-value store for blocking code: :class:`KeyValue` and its :class:`Watch`."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from .._errors import (
    ClusterTimeoutError,
    InvalidTypeError,
    JetStreamError,
    KeyExistsError,
    KeyNotFoundError,
    NatsClusterError,
    NoRespondersError,
    RevisionMismatchError,
    StreamNotFoundError,
    SubscriptionClosedError,
    SubscriptionModeError,
)
from .._message import Msg
from .._receive.dispatcher import Dispatcher
from .._receive.subscription import Subscription
from .._wire import check_timeout
from . import api, kv, kv_write
from .kv import DEL, OP_HEADER, PURGE, ROLLUP_HEADER, Entry, Step, WatchState

__all__ = ("KeyValue", "Watch")

Callback = Callable[[Entry], object]
_TICK = 1.0  # how often a watch checks its consumer (heartbeats, reconnections)


class Core(Protocol):
    @property
    def logger(self) -> logging.Logger: ...

    def counter(self, key: str) -> int: ...


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


class KeyValue:
    """A key-value bucket, for blocking code (``js.key_value(bucket)``): thread-safe.
    Every call takes a *timeout* (default: the cluster's).

    Keys are ``[-/_=.A-Za-z0-9]`` tokens separated by dots; values are bytes-like.
    """

    def __init__(self, nats: Nats, bucket: str, timeout: float, direct: bool = True) -> None:
        self._nats = nats
        self.bucket = kv.check_bucket(bucket)
        self.stream = kv.stream_name(bucket)
        self._prefix = kv.prefix(bucket)
        self._timeout = timeout
        self._direct = direct

    def __repr__(self) -> str:
        return f"<KeyValue bucket={self.bucket!r} cluster={self._nats.name!r}>"

    def _wait(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else check_timeout(timeout)

    def _request(self, subject: str, payload: bytes, wait: float, headers: Mapping[str, str] | None = None) -> Msg:
        try:
            return self._nats.request(subject, payload, wait, headers=headers)
        except NoRespondersError:
            name = self._nats.name
            raise JetStreamError(
                f"cluster {name!r}: bucket {self.bucket!r}: no JetStream answered (not enabled, not ready, or the"
                " bucket was deleted)",
                cluster=name,
                code=503,
            ) from None

    # -- writing -------------------------------------------------------------------
    def _write(self, key: str, value: bytes, headers: dict[str, str] | None, last: int | None, wait: float) -> int:
        headers = kv_write.write_headers(headers, last)
        deadline = time.monotonic() + wait
        reply = self._request(self._prefix + key, value, wait, headers)
        try:
            return kv.read_pub_ack(reply.data, self.bucket, key, last, self._nats.name)
        except RevisionMismatchError:
            if headers is None or kv.MSG_ID not in headers:
                raise
            try:  # the conflict may be our own write, sent again after a lost connection
                subject, query = kv_write.last_query(self.bucket, key)
                got = self._request(subject, query, max(0.0, deadline - time.monotonic()))
            except NatsClusterError:
                got = None
            revision = None if got is None else kv_write.written_by(got.data, headers[kv.MSG_ID])
            if revision is None:
                raise
            return revision

    def put(self, key: str, value: bytes, timeout: float | None = None) -> int:
        """Store *value* under *key*; returns its revision. Identical values put twice
        are two revisions (no de-duplication); so is a put whose answer was lost with the
        connection and that was sent again on the next (at least once). A conditional
        write sent again that way (create, update, delete with *last*) reports its
        first revision, not a conflict.

        :raises InvalidMessageError: for a bad key (wildcards, spaces, empty, leading or
            trailing dot); :raises InvalidTypeError: for a value that is not bytes-like.
        :raises JetStreamError: when the bucket's stream refused it (code 503: none answered).
        """
        kv.check_key(key)
        return self._write(key, kv.check_value(value), None, None, self._wait(timeout))

    def create(self, key: str, value: bytes, timeout: float | None = None) -> int:
        """Store *value* only when *key* has none (never put, deleted or purged).

        :raises KeyExistsError: when it has one.
        """
        kv.check_key(key)
        data = kv.check_value(value)
        wait = self._wait(timeout)
        deadline = time.monotonic() + wait
        try:
            return self._write(key, data, None, 0, wait)
        except KeyExistsError:
            try:  # a delete or purge marker is a revision too: create over it
                self.get(key, timeout=max(0.0, deadline - time.monotonic()))
            except KeyNotFoundError as gone:
                if not gone.revision:
                    raise
                try:
                    return self._write(key, data, None, gone.revision, max(0.0, deadline - time.monotonic()))
                except RevisionMismatchError as exc:  # another writer came first
                    raise kv_write.key_exists(exc) from None
            raise

    def update(self, key: str, value: bytes, last: int, timeout: float | None = None) -> int:
        """Store *value* only when *key*'s latest revision is *last*.

        :raises RevisionMismatchError: when it is not.
        """
        kv.check_key(key)
        return self._write(key, kv.check_value(value), None, kv.check_revision(last), self._wait(timeout))

    def delete(self, key: str, last: int | None = None, timeout: float | None = None) -> int:
        """Mark *key* deleted (earlier revisions stay in its history); returns the
        marker's revision. With *last*, only when that is the key's revision."""
        kv.check_key(key)
        if last is not None:
            kv.check_revision(last)
        return self._write(key, b"", {OP_HEADER: DEL}, last, self._wait(timeout))

    def purge(self, key: str, timeout: float | None = None) -> int:
        """Delete *key* and drop its earlier revisions; returns the marker's revision."""
        kv.check_key(key)
        return self._write(key, b"", {OP_HEADER: PURGE, ROLLUP_HEADER: "sub"}, None, self._wait(timeout))

    # -- reading -------------------------------------------------------------------
    def get(self, key: str, revision: int | None = None, timeout: float | None = None) -> Entry:
        """The latest entry of *key* (or the one at *revision*).

        :raises KeyNotFoundError: when it has no value (never put, deleted or purged;
            ``revision`` and ``operation`` then say which marker).
        """
        kv.check_key(key)
        wait = self._wait(timeout)
        name = self._nats.name
        subject = self._prefix + key
        if revision is None and self._direct:
            try:
                reply = self._nats.request(f"{api.API}DIRECT.GET.{self.stream}.{subject}", b"", wait)
            except NoRespondersError:
                raise kv.not_found(self.bucket, name) from None
            return kv.entry_from_direct(self.bucket, key, reply, name)
        query: dict[str, Any] = {"last_by_subj": subject} if revision is None else {"seq": kv.check_revision(revision)}
        reply = self._request(f"{api.API}STREAM.MSG.GET.{self.stream}", json.dumps(query).encode(), wait)
        return kv.entry_from_get(self.bucket, key, reply.data, name)

    def keys(self, keys: str = ">", timeout: float | None = None) -> list[str]:
        """The keys that have a value (not deleted or purged), matching the filter *keys*."""
        with self.watch(keys, ignore_deletes=True, headers_only=True, timeout=timeout) as w:
            w.wait_caught_up(self._wait(timeout))
            return sorted({e.key for e in w._drain()})

    def history(self, key: str, timeout: float | None = None) -> list[Entry]:
        """Every revision of *key* the bucket keeps (up to its ``history``), oldest
        first, delete and purge markers included; ``[]`` for a key never put."""
        kv.check_key(key)
        with self.watch(key, include_history=True, timeout=timeout) as w:
            w.wait_caught_up(self._wait(timeout))
            return w._drain()

    def watch(
        self,
        keys: str = ">",
        callback: Callback | None = None,
        *,
        include_history: bool = False,
        ignore_deletes: bool = False,
        updates_only: bool = False,
        headers_only: bool = False,
        dispatcher: Dispatcher | None = None,
        timeout: float | None = None,
    ) -> Watch:
        """Follow the keys matching *keys* (``*`` a token, ``>`` the rest): first their
        current values (all their history with *include_history*; none with
        *updates_only*), then every change, deletes and purges included (as entries whose
        ``operation`` is ``"DEL"``/``"PURGE"``) unless *ignore_deletes*.

        With *callback*, each entry is passed to it on a worker thread (the watch's own,
        or *dispatcher*'s), one at a time, in revision order; without, read them with
        :meth:`Watch.next` or by iterating. The watch survives a lost connection and a
        restarted server without missing or repeating a revision.

        :raises BucketNotFoundError: when there is no such bucket.
        """
        kv.check_key(keys, wildcards=True)
        if callback is not None and not callable(callback):
            raise InvalidTypeError(f"callback must be callable, not {type(callback).__name__}")
        state = WatchState(self.bucket, keys, include_history, ignore_deletes, updates_only, headers_only)
        return Watch(self._nats, state, callback, dispatcher, self._wait(timeout))


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
        """
        wait = self._timeout if timeout is None else check_timeout(timeout)
        if not self._caught.wait(wait):
            raise ClusterTimeoutError(
                f"watch {self._state.bucket}/{self._state.keys}: not caught up within {wait:g} s",
                cluster=self._nats.name,
            )

    def next(self, timeout: float | None = None) -> Entry:
        """The next entry.

        :raises ClusterTimeoutError: when none came within *timeout* s.
        :raises SubscriptionClosedError: after :meth:`stop`, once none is left.
        :raises SubscriptionModeError: for a watch with a callback.
        """
        if self._callback is not None:
            raise SubscriptionModeError("next() on a watch with a callback")
        wait = self._timeout if timeout is None else check_timeout(timeout)
        deadline = time.monotonic() + wait
        with self._ready:
            while not self._entries:
                if self._stopped.is_set():
                    raise SubscriptionClosedError(
                        f"watch {self._state.bucket}/{self._state.keys} stopped", cluster=self._nats.name
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClusterTimeoutError(
                        f"watch {self._state.bucket}/{self._state.keys}: no entry within {wait:g} s",
                        cluster=self._nats.name,
                    )
                self._ready.wait(left)
            return self._entries.popleft()

    def __iter__(self) -> Iterator[Entry]:
        """Entries as they come, until :meth:`stop`."""
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
                self._caught.set()
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
            self._caught.set()

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
        while not self._stopped.wait(_TICK):
            reconnects = self._nats.cluster.counter("reconnects")
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
        unless called from it); :meth:`next` raises once the queue is empty. Idempotent."""
        wait = self._timeout if timeout is None else check_timeout(timeout)
        if self._stopped.is_set():
            return
        self._stopped.set()
        with self._ready:
            self._ready.notify_all()
        if threading.current_thread() is not self._monitor:
            self._monitor.join(wait)
        # Not under the lock: a callback calling stop() may hold the delivery lock.
        subs, self._retired = [*self._retired, *([self._sub] if self._sub else [])], []
        stale, self._stale = [*self._stale, self._state.consumer], []
        for sub in subs:
            sub.unsubscribe(wait)
        for consumer in stale:
            self._delete(consumer, min(wait, 2.0))

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
