"""The blocking JetStream handle: streams, consumers, pull subscriptions, worker pools."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol, cast

from .._errors import (
    ClusterTimeoutError,
    ConsumerNotFoundError,
    InvalidMessageError,
    InvalidTypeError,
    JetStreamError,
    NatsClusterError,
    NoRespondersError,
    StreamNotFoundError,
    SubscriptionClosedError,
)
from .._message import Msg
from .._receive.subscription import Subscription
from .._wire import check_timeout
from . import api, kv, kv_sync
from .api import Call, ConsumerInfo, StreamInfo
from .consume import Consumer, Handler
from .kv_sync import KeyValue
from .msg import JsMsg, consumer_gone
from .pull import CHECK, WAIT, PullState, fetch_life

__all__ = ("Blocking", "JetStream", "PullSubscription")


class Core(Protocol):
    """What the handle needs of the asyncio core (thread-safe parts only)."""

    @property
    def logger(self) -> logging.Logger: ...

    def count(self, key: str, amount: int = 1) -> None: ...

    def counter(self, key: str) -> int: ...


class Blocking(Protocol):
    """What the handle needs of the blocking facade."""

    @property
    def name(self) -> str: ...

    @property
    def cluster(self) -> Core: ...

    def connect(self, timeout: float | None = None) -> None: ...

    def publish(self, subject: str, payload: bytes, timeout: float | None = None) -> None: ...

    def request(self, subject: str, payload: bytes = b"", timeout: float | None = None) -> Msg: ...

    def subscribe(self, subject: str, *, timeout: float | None = None) -> Subscription: ...

    def _send_to(
        self, subject: str, reply: str, payload: bytes, timeout: float | None, *, counted: bool = True
    ) -> None:
        """Queue a message with a reply subject, connecting first if need be."""


def check_batch(batch: object) -> int:
    if not isinstance(batch, int) or isinstance(batch, bool):
        raise InvalidTypeError(f"batch must be int, not {type(batch).__name__}")
    if not 1 <= batch <= 100_000:
        raise InvalidMessageError(f"batch must be between 1 and 100000, not {batch}")
    return batch


class _Acker:
    """Acknowledgements through the cluster's publish and request (counted when they fail)."""

    def __init__(self, nats: Blocking) -> None:
        self._nats = nats

    def send_ack(self, subject: str, payload: bytes) -> None:
        try:
            self._nats.publish(subject, payload)
        except NatsClusterError:
            self._nats.cluster.count("js_ack_errors")
            raise

    def confirm_ack(self, subject: str, payload: bytes, timeout: float | None) -> None:
        try:
            self._nats.request(subject, payload, timeout)
        except NoRespondersError:
            self._nats.cluster.count("js_ack_errors")
            raise consumer_gone(self._nats.name, subject) from None
        except NatsClusterError:
            self._nats.cluster.count("js_ack_errors")
            raise


class JetStream:
    """JetStream for blocking code, bound to one cluster (``nats.jetstream()``): cheap to
    make, safe to share between threads. Every call takes a *timeout* (default: the
    cluster's).

    Errors: :class:`StreamNotFoundError` and :class:`ConsumerNotFoundError` at once when the
    server says so; :class:`JetStreamError` for the API's other refusals (``code 503`` when
    no JetStream answered); bad arguments raise :class:`InvalidMessageError` or
    :class:`InvalidTypeError` in the caller; and the cluster's own errors.
    """

    def __init__(self, nats: Blocking, timeout: float) -> None:
        self._nats = nats
        self._timeout = timeout
        self._acker = _Acker(nats)

    def __repr__(self) -> str:
        return f"<JetStream cluster={self._nats.name!r}>"

    @property
    def cluster_name(self) -> str:
        return self._nats.name

    def _call(self, call: Call, timeout: float | None) -> Any:
        subject, payload, what, read = call
        try:
            reply = self._nats.request(subject, payload, self._timeout if timeout is None else timeout)
        except NoRespondersError:
            name = self._nats.name
            raise JetStreamError(
                f"cluster {name!r}: {what}: no JetStream answered (not enabled, or not ready)", cluster=name, code=503
            ) from None
        return read(api.parse_reply(reply.data, self._nats.name, what))

    # -- streams -------------------------------------------------------------------
    def add_stream(
        self,
        name: str,
        subjects: Sequence[str] | None = None,
        storage: str = "file",
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> StreamInfo:
        """Create a stream (or return it, when one with the same configuration exists).

        :param options: other fields of the server's stream configuration (``retention``,
            ``max_msgs``, ``max_bytes``, ``num_replicas``, ``discard``, ...); ``max_age``
            and ``duplicate_window`` in seconds.
        :raises JetStreamError: when the server refused it (e.g. a different stream of
            that name, subjects that overlap another stream's).
        """
        config = api.stream_config(name, subjects if subjects is not None else [name], storage, options)
        info: StreamInfo = self._call(api.add_stream_call(config), timeout)
        return info

    def update_stream(
        self, name: str, subjects: Sequence[str] | None = None, *, timeout: float | None = None, **options: Any
    ) -> StreamInfo:
        """Change a stream's configuration: the fields given replace the current ones.

        :raises StreamNotFoundError: when there is no such stream.
        """
        change = api.stream_config(name, subjects, None, options)
        wait = self._timeout if timeout is None else check_timeout(timeout)
        deadline = time.monotonic() + wait
        current = self.stream_info(name, timeout=wait)
        config = api.merged(current.config, change)
        info: StreamInfo = self._call(api.update_stream_call(config), max(0.0, deadline - time.monotonic()))
        return info

    def stream_info(self, name: str, *, timeout: float | None = None) -> StreamInfo:
        """:raises StreamNotFoundError: when there is no such stream."""
        info: StreamInfo = self._call(api.stream_info_call(name), timeout)
        return info

    def delete_stream(self, name: str, *, timeout: float | None = None) -> None:
        """Delete a stream, its messages and its consumers.

        :raises StreamNotFoundError: when there is no such stream.
        """
        self._call(api.delete_stream_call(name), timeout)

    def stream_for(self, subject: str, *, timeout: float | None = None) -> str:
        """The name of the stream that stores *subject*.

        :raises StreamNotFoundError: when no stream does.
        """
        names: list[str] = self._call(api.stream_for_call(subject), timeout)
        if not names:
            name = self._nats.name
            raise StreamNotFoundError(
                f"cluster {name!r}: no stream stores {subject[:80]!r}", cluster=name, code=404, err_code=10059
            )
        return names[0]

    # -- consumers -----------------------------------------------------------------
    def consumer_info(self, stream: str, consumer: str, *, timeout: float | None = None) -> ConsumerInfo:
        """:raises ConsumerNotFoundError, StreamNotFoundError: when there is no such consumer or stream."""
        info: ConsumerInfo = self._call(api.consumer_info_call(stream, consumer), timeout)
        return info

    def delete_consumer(self, stream: str, consumer: str, *, timeout: float | None = None) -> None:
        """:raises ConsumerNotFoundError, StreamNotFoundError: when there is no such consumer or stream."""
        self._call(api.delete_consumer_call(stream, consumer), timeout)

    def pull_subscribe(
        self,
        subject: str,
        durable: str | None = None,
        stream: str | None = None,
        *,
        ack_wait: float = 30.0,
        max_deliver: int | None = None,
        deliver_policy: str = "all",
        opt_start_seq: int | None = None,
        max_ack_pending: int | None = None,
        timeout: float | None = None,
    ) -> PullSubscription:
        """A pull subscription on the consumer *durable* of *stream* (found from *subject*
        when None), created or updated to this configuration (explicit acks). With
        *durable* None the consumer is ephemeral: deleted at :meth:`PullSubscription.
        unsubscribe`, or by the server after 5 minutes unused.

        :raises StreamNotFoundError: at once when no stream stores *subject*.
        :raises JetStreamError: when the server refused the consumer (e.g. a durable of
            that name with another subject).
        """
        config = api.consumer_config(
            durable,
            subject,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            deliver_policy=deliver_policy,
            opt_start_seq=opt_start_seq,
            max_ack_pending=max_ack_pending,
            inactive_threshold=None if durable is not None else 300.0,
        )
        wait = self._timeout if timeout is None else check_timeout(timeout)
        deadline = time.monotonic() + wait
        if stream is None:
            stream = self.stream_for(subject, timeout=wait)
        api.check_name("stream", stream)
        left = max(0.0, deadline - time.monotonic())
        info: ConsumerInfo = self._call(api.add_consumer_call(stream, config), left)
        return PullSubscription(self, stream, info.name, durable is None, max(0.0, deadline - time.monotonic()))

    def pull_subscribe_bind(self, durable: str, stream: str, *, timeout: float | None = None) -> PullSubscription:
        """A pull subscription on an existing consumer, leaving its configuration as it is.

        :raises ConsumerNotFoundError, StreamNotFoundError: when there is no such consumer or stream.
        """
        wait = self._timeout if timeout is None else check_timeout(timeout)
        deadline = time.monotonic() + wait
        info = self.consumer_info(stream, durable, timeout=wait)
        return PullSubscription(self, stream, info.name, False, max(0.0, deadline - time.monotonic()))

    def consume(
        self,
        subject: str,
        handler: Handler,
        durable: str | None = None,
        stream: str | None = None,
        *,
        workers: int = 4,
        ack_wait: float = 30.0,
        max_deliver: int | None = None,
        deliver_policy: str = "all",
        prefetch: int = 0,
        timeout: float | None = None,
    ) -> Consumer:
        """Process the messages of a consumer with *handler* on *workers* threads.

        ``handler(msg)`` returning acks the message; raising naks it (it is redelivered;
        logged with its traceback, counted in :attr:`Consumer.failed`); a handler may
        ``ack``, ``nak``, ``term`` or ``in_progress`` itself. Only what idle workers can
        take is fetched. :meth:`Consumer.stop` lets running handlers finish.

        :param prefetch: fetch in batches, up to this many messages more than the idle
            workers take, queued in this process (kept alive with ``in_progress`` while
            they wait): faster for short handlers, less fair to other processes of the
            same consumer. 0 (the default): each worker fetches its own message.
        :raises: as :meth:`pull_subscribe`.
        """
        if not callable(handler):
            raise InvalidTypeError(f"handler must be callable, not {type(handler).__name__}")
        if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 1024:
            raise InvalidMessageError(f"workers must be an int between 1 and 1024, not {workers!r}")
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or not 0 <= prefetch <= 100_000:
            raise InvalidMessageError(f"prefetch must be an int between 0 and 100000, not {prefetch!r}")
        wait = self._timeout if timeout is None else check_timeout(timeout)
        deadline = time.monotonic() + wait
        first = self.pull_subscribe(
            subject,
            durable,
            stream,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            deliver_policy=deliver_policy,
            timeout=wait,
        )
        subs = [first]
        try:
            for _ in range(0 if prefetch else workers - 1):
                left = max(0.0, deadline - time.monotonic())
                subs.append(PullSubscription(self, first.stream, first.consumer, False, left))
        except BaseException:
            for sub in subs:
                sub.unsubscribe()
            raise
        core = self._nats.cluster
        return Consumer(subs, handler, core.logger, core.count, workers=workers, prefetch=prefetch, ack_wait=ack_wait)

    # -- used by PullSubscription ---------------------------------------------------
    def _send_pull(self, subject: str, reply: str, payload: bytes, timeout: float) -> None:
        self._nats._send_to(subject, reply, payload, timeout, counted=False)

    # -- key-value store -------------------------------------------------------------
    def create_key_value(
        self,
        bucket: str,
        *,
        history: int = 1,
        ttl: float | None = None,
        storage: str = "file",
        timeout: float | None = None,
        **options: Any,
    ) -> KeyValue:
        """Create the key-value bucket *bucket* (the stream ``KV_<bucket>``), or bind to
        it when one with the same configuration exists.

        :param history: revisions kept per key (1 to 64).
        :param ttl: seconds a revision is kept (None: for ever).
        :param options: ``max_value_size``, ``max_bytes``, ``replicas``, ``description``.
        :raises JetStreamError: when the server refused it (e.g. a bucket of that name
            with another configuration).
        """
        config = kv.bucket_config(bucket, history, ttl, storage, options)
        self._call(api.add_stream_call(config), timeout)
        return KeyValue(cast("kv_sync.Nats", self._nats), bucket, self._timeout)

    def key_value(self, bucket: str, *, timeout: float | None = None) -> KeyValue:
        """The existing key-value bucket *bucket*.

        :raises BucketNotFoundError: when there is none.
        """
        kv.check_bucket(bucket)
        try:
            info = self.stream_info(kv.stream_name(bucket), timeout=timeout)
        except StreamNotFoundError as exc:
            raise kv.not_found(bucket, self._nats.name, exc) from None
        direct = bool(info.config.get("allow_direct"))
        return KeyValue(cast("kv_sync.Nats", self._nats), bucket, self._timeout, direct)

    def delete_key_value(self, bucket: str, *, timeout: float | None = None) -> None:
        """Delete the bucket *bucket* and every key in it.

        :raises BucketNotFoundError: when there is none.
        """
        kv.check_bucket(bucket)
        try:
            self.delete_stream(kv.stream_name(bucket), timeout=timeout)
        except StreamNotFoundError as exc:
            raise kv.not_found(bucket, self._nats.name, exc) from None


class PullSubscription:
    """A pull subscription (``js.pull_subscribe``). :meth:`fetch` may be called from any
    thread; fetches of one subscription take turns."""

    def __init__(self, js: JetStream, stream: str, consumer: str, ephemeral: bool, timeout: float) -> None:
        self._js = js
        self.stream = stream
        self.consumer = consumer
        self._ephemeral = ephemeral
        self._state = PullState(api.next_subject(stream, consumer))
        self._sub = js._nats.subscribe(self._state.subject, timeout=timeout)
        self._lock = threading.Lock()
        self._name = js.cluster_name
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"<PullSubscription stream={self.stream!r} consumer={self.consumer!r}>"

    @property
    def pending(self) -> int:
        """Messages received and not yet fetched (what interrupted requests still sent)."""
        return self._sub.pending

    def fetch(self, batch: int = 1, timeout: float | None = None) -> list[JsMsg]:
        """Up to *batch* messages: those stored now, or else the first to come within
        *timeout* s (and those right behind it); ``[]`` when none came. During an outage
        it waits for the reconnection within *timeout*, and asks again.

        :raises ConsumerNotFoundError, StreamNotFoundError: when the consumer or its
            stream no longer exists (at once).
        :raises SubscriptionClosedError: after :meth:`unsubscribe` or the cluster's close;
            in a forked child (at once: a parent's fetch may hold the turn).
        """
        check_batch(batch)
        js = self._js
        wait = js._timeout if timeout is None else check_timeout(timeout)
        if self._pid != os.getpid():
            raise SubscriptionClosedError(
                f"cluster {self._name!r}: pull subscription {self.consumer!r} was made by the parent process "
                "and does not deliver in a forked child; subscribe again in the child",
                cluster=self._name,
                subject=self._state.subject,
            )
        deadline = time.monotonic() + wait
        if not self._lock.acquire(timeout=wait):
            return []
        try:
            msgs = self._fetch(batch, wait, deadline)
        finally:
            self._lock.release()
        acker = js._acker
        return [JsMsg(m, acker) for m in msgs]

    def _fetch(self, batch: int, wait: float, deadline: float) -> list[Msg]:
        js = self._js
        core = js._nats.cluster
        sub = self._sub
        next_subject = self._state.next_subject

        def send(reply: str, payload: bytes) -> None:
            js._send_pull(next_subject, reply, payload, max(0.0, deadline - time.monotonic()))

        life = fetch_life(
            self._state,
            batch,
            max(0.0, deadline - time.monotonic()),
            time.monotonic,
            send,
            lambda: core.counter("reconnects"),
            self._name,
        )
        try:
            step, left = next(life)
            while True:
                if step == WAIT:
                    try:
                        msg: Msg | None = sub.next_msg(max(0.0, left))
                    except ClusterTimeoutError:
                        msg = None
                    step, left = life.send(msg)
                else:
                    assert step == CHECK
                    self._check_consumer(deadline)
                    step, left = life.send(None)
        except StopIteration as end:
            got: list[Msg] = end.value
            return got
        finally:
            life.close()

    def _check_consumer(self, deadline: float) -> None:
        """No JetStream answered a pull request: raise when the consumer (or its stream) is
        gone; go on when JetStream is only not ready (after a restart)."""
        try:
            self._js.consumer_info(self.stream, self.consumer, timeout=max(0.01, deadline - time.monotonic()))
        except (ClusterTimeoutError, JetStreamError) as exc:
            if isinstance(exc, StreamNotFoundError | ConsumerNotFoundError):
                raise

    def unsubscribe(self, timeout: float | None = None) -> None:
        """Stop fetching; messages received and not fetched are dropped (counted in the
        cluster's ``discarded``; the server redelivers them after their ack wait). A
        durable consumer stays on the server; an ephemeral one is deleted (not from a
        forked child: the parent's subscription and consumer are left to it)."""
        if os.getpid() != self._pid:
            return
        self._sub.unsubscribe(timeout)
        if self._ephemeral:
            try:
                self._js.delete_consumer(self.stream, self.consumer, timeout=timeout)
            except NatsClusterError as exc:  # the server deletes it when unused, in any case
                self._js._nats.cluster.logger.debug("ephemeral consumer %s not deleted: %s", self.consumer, exc)

    def __enter__(self) -> PullSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()
