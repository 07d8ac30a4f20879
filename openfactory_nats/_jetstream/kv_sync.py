"""The key-value store for blocking code: :class:`KeyValue` and its :class:`Watch`."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from .._errors import (
    InvalidTypeError,
    JetStreamError,
    KeyExistsError,
    KeyNotFoundError,
    NatsClusterError,
    NoRespondersError,
    RevisionMismatchError,
)
from .._message import Msg
from .._receive.dispatcher import Dispatcher
from .._wire import check_timeout
from . import api, kv, kv_write
from .kv import DEL, OP_HEADER, PURGE, ROLLUP_HEADER, Entry, WatchState
from .kv_watch import Callback, Nats, Watch

__all__ = ("KeyValue", "Nats", "Watch")


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
