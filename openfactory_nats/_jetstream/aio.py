"""The asyncio JetStream handle (``NatsCluster.jetstream()``): the blocking handle's
calls as coroutines, on the same API payloads and the same fetch logic."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, cast

from .. import _tracing
from .._errors import (
    ClusterClosedError,
    ClusterTimeoutError,
    ClusterUnavailableError,
    ConsumerNotFoundError,
    InvalidMessageError,
    InvalidTypeError,
    JetStreamError,
    NatsClusterError,
    NoRespondersError,
    StreamNotFoundError,
)
from .._message import Msg
from .._receive.subscription import AsyncSubscription
from .._wire import check_timeout
from . import api, kv, kv_aio
from .api import Call, ConsumerInfo, StreamInfo
from .handle import check_batch
from .kv_aio import AsyncKeyValue
from .msg import AsyncJsMsg, consumer_gone
from .pull import CHECK, WAIT, PullState, fetch_life

__all__ = ("AsyncConsumer", "AsyncJetStream", "AsyncPullSubscription")

AsyncHandler = Callable[[AsyncJsMsg], Awaitable[Any]]


class Core(Protocol):
    """What the handle needs of the asyncio core."""

    @property
    def name(self) -> str: ...

    @property
    def logger(self) -> logging.Logger: ...

    def count(self, key: str, amount: int = 1) -> None: ...

    def counter(self, key: str) -> int: ...

    def offer_pull(self, subject: str, reply: str, payload: bytes, timeout: float) -> bool: ...

    async def publish(self, subject: str, payload: bytes) -> None: ...

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 10.0) -> Msg: ...

    async def subscribe(self, subject: str) -> AsyncSubscription: ...


class _Acker:
    def __init__(self, core: Core) -> None:
        self._core = core

    async def send_ack(self, subject: str, payload: bytes) -> None:
        try:
            await self._core.publish(subject, payload)
        except NatsClusterError:
            self._core.count("js_ack_errors")
            raise

    async def confirm_ack(self, subject: str, payload: bytes, timeout: float | None) -> None:
        try:
            await self._core.request(subject, payload, 10.0 if timeout is None else timeout)
        except NoRespondersError:
            self._core.count("js_ack_errors")
            raise consumer_gone(self._core.name, subject) from None
        except NatsClusterError:
            self._core.count("js_ack_errors")
            raise


class AsyncJetStream:
    """JetStream for asyncio code, bound to one cluster: the calls of the blocking
    :class:`~openfactory_nats.JetStream`, as coroutines (default timeout 10 s)."""

    def __init__(self, core: Core, timeout: float = 10.0) -> None:
        self._core = core
        self._timeout = timeout
        self._acker = _Acker(core)

    def __repr__(self) -> str:
        return f"<AsyncJetStream cluster={self._core.name!r}>"

    async def _call(self, call: Call, timeout: float | None) -> Any:
        subject, payload, what, read = call
        try:
            reply = await self._core.request(subject, payload, self._timeout if timeout is None else timeout)
        except NoRespondersError:
            name = self._core.name
            raise JetStreamError(
                f"cluster {name!r}: {what}: no JetStream answered (not enabled, or not ready)", cluster=name, code=503
            ) from None
        return read(api.parse_reply(reply.data, self._core.name, what))

    async def add_stream(
        self,
        name: str,
        subjects: Sequence[str] | None = None,
        storage: str = "file",
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> StreamInfo:
        config = api.stream_config(name, subjects if subjects is not None else [name], storage, options)
        info: StreamInfo = await self._call(api.add_stream_call(config), timeout)
        return info

    async def update_stream(
        self, name: str, subjects: Sequence[str] | None = None, *, timeout: float | None = None, **options: Any
    ) -> StreamInfo:
        change = api.stream_config(name, subjects, None, options)
        current = await self.stream_info(name, timeout=timeout)
        info: StreamInfo = await self._call(api.update_stream_call(api.merged(current.config, change)), timeout)
        return info

    async def stream_info(self, name: str, *, timeout: float | None = None) -> StreamInfo:
        info: StreamInfo = await self._call(api.stream_info_call(name), timeout)
        return info

    async def delete_stream(self, name: str, *, timeout: float | None = None) -> None:
        await self._call(api.delete_stream_call(name), timeout)

    async def stream_for(self, subject: str, *, timeout: float | None = None) -> str:
        names: list[str] = await self._call(api.stream_for_call(subject), timeout)
        if not names:
            name = self._core.name
            raise StreamNotFoundError(
                f"cluster {name!r}: no stream stores {subject[:80]!r}", cluster=name, code=404, err_code=10059
            )
        return names[0]

    async def consumer_info(self, stream: str, consumer: str, *, timeout: float | None = None) -> ConsumerInfo:
        info: ConsumerInfo = await self._call(api.consumer_info_call(stream, consumer), timeout)
        return info

    async def delete_consumer(self, stream: str, consumer: str, *, timeout: float | None = None) -> None:
        await self._call(api.delete_consumer_call(stream, consumer), timeout)

    async def pull_subscribe(
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
    ) -> AsyncPullSubscription:
        """As the blocking :meth:`JetStream.pull_subscribe <openfactory_nats.JetStream.pull_subscribe>`."""
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
        if stream is None:
            stream = await self.stream_for(subject, timeout=timeout)
        api.check_name("stream", stream)
        info: ConsumerInfo = await self._call(api.add_consumer_call(stream, config), timeout)
        return await AsyncPullSubscription.open(self, stream, info.name, durable is None)

    async def consume(
        self,
        subject: str,
        handler: AsyncHandler,
        durable: str | None = None,
        stream: str | None = None,
        *,
        workers: int = 4,
        ack_wait: float = 30.0,
        max_deliver: int | None = None,
        deliver_policy: str = "all",
        timeout: float | None = None,
    ) -> AsyncConsumer:
        """As the blocking :meth:`JetStream.consume <openfactory_nats.JetStream.consume>`,
        with a coroutine *handler* run by *workers* tasks."""
        if not callable(handler):
            raise InvalidTypeError(f"handler must be callable, not {type(handler).__name__}")
        if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 1024:
            raise InvalidMessageError(f"workers must be an int between 1 and 1024, not {workers!r}")
        first = await self.pull_subscribe(
            subject,
            durable,
            stream,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            deliver_policy=deliver_policy,
            timeout=timeout,
        )
        subs = [first]
        for _ in range(workers - 1):
            subs.append(await AsyncPullSubscription.open(self, first.stream, first.consumer, False))
        return AsyncConsumer(subs, handler, self._core)

    def _send_pull(self, subject: str, reply: str, payload: bytes) -> None:
        if not self._core.offer_pull(subject, reply, payload, 0.0):
            name = self._core.name
            raise ClusterUnavailableError(f"cluster {name!r}: not connected", cluster=name)

    # -- key-value store -------------------------------------------------------------
    async def create_key_value(
        self,
        bucket: str,
        *,
        history: int = 1,
        ttl: float | None = None,
        storage: str = "file",
        timeout: float | None = None,
        **options: Any,
    ) -> AsyncKeyValue:
        """As the blocking :meth:`JetStream.create_key_value <openfactory_nats.JetStream.create_key_value>`."""
        config = kv.bucket_config(bucket, history, ttl, storage, options)
        await self._call(api.add_stream_call(config), timeout)
        return AsyncKeyValue(cast("kv_aio.Core", self._core), bucket, self._timeout)

    async def key_value(self, bucket: str, *, timeout: float | None = None) -> AsyncKeyValue:
        """:raises BucketNotFoundError: when there is no such bucket."""
        kv.check_bucket(bucket)
        try:
            info = await self.stream_info(kv.stream_name(bucket), timeout=timeout)
        except StreamNotFoundError as exc:
            raise kv.not_found(bucket, self._core.name, exc) from None
        direct = bool(info.config.get("allow_direct"))
        return AsyncKeyValue(cast("kv_aio.Core", self._core), bucket, self._timeout, direct)

    async def delete_key_value(self, bucket: str, *, timeout: float | None = None) -> None:
        """:raises BucketNotFoundError: when there is no such bucket."""
        kv.check_bucket(bucket)
        try:
            await self.delete_stream(kv.stream_name(bucket), timeout=timeout)
        except StreamNotFoundError as exc:
            raise kv.not_found(bucket, self._core.name, exc) from None


class AsyncPullSubscription:
    """A pull subscription for asyncio code (one fetch at a time)."""

    def __init__(
        self, js: AsyncJetStream, stream: str, consumer: str, ephemeral: bool, sub: AsyncSubscription, state: PullState
    ) -> None:
        self._js = js
        self.stream = stream
        self.consumer = consumer
        self._ephemeral = ephemeral
        self._sub = sub
        self._state = state
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, js: AsyncJetStream, stream: str, consumer: str, ephemeral: bool) -> AsyncPullSubscription:
        state = PullState(api.next_subject(stream, consumer))
        sub = await js._core.subscribe(state.subject)
        return cls(js, stream, consumer, ephemeral, sub, state)

    async def fetch(self, batch: int = 1, timeout: float | None = None) -> list[AsyncJsMsg]:
        """As the blocking :meth:`PullSubscription.fetch <openfactory_nats.PullSubscription.fetch>`."""
        check_batch(batch)
        js = self._js
        core = js._core
        wait = js._timeout if timeout is None else check_timeout(timeout)
        loop = asyncio.get_running_loop()
        next_subject = self._state.next_subject
        async with self._lock:
            life = fetch_life(
                self._state,
                batch,
                wait,
                loop.time,
                lambda reply, payload: js._send_pull(next_subject, reply, payload),
                lambda: core.counter("reconnects"),
                core.name,
            )
            try:
                step, left = next(life)
                while True:
                    if step == WAIT:
                        try:
                            msg: Msg | None = await self._sub.next_msg(max(0.0, left))
                        except ClusterTimeoutError:
                            msg = None
                        step, left = life.send(msg)
                    else:
                        assert step == CHECK
                        try:
                            await js.consumer_info(self.stream, self.consumer, timeout=max(0.01, wait))
                        except (ClusterTimeoutError, JetStreamError) as exc:
                            if isinstance(exc, StreamNotFoundError | ConsumerNotFoundError):
                                raise
                        step, left = life.send(None)
            except StopIteration as end:
                got: list[Msg] = end.value
            finally:
                life.close()
        acker = js._acker
        return [AsyncJsMsg(m, acker) for m in got]

    async def unsubscribe(self) -> None:
        await self._sub.unsubscribe()
        if self._ephemeral:
            try:
                await self._js.delete_consumer(self.stream, self.consumer)
            except NatsClusterError as exc:
                self._js._core.logger.debug("ephemeral consumer %s not deleted: %s", self.consumer, exc)


class AsyncConsumer:
    """A running pool of worker tasks (``await js.consume(...)``)."""

    def __init__(self, subs: list[AsyncPullSubscription], handler: AsyncHandler, core: Core) -> None:
        self._subs = subs
        self.consumer = subs[0].consumer
        self._handler = handler
        self._core = core
        self.processed = 0
        self.failed = 0
        self._stopping = False
        self._tasks = [asyncio.get_running_loop().create_task(self._work(sub)) for sub in subs]

    @property
    def running(self) -> bool:
        """True until :meth:`stop` ended it, or the cluster's close, or the consumer or
        its stream deleted on the server (logged as an error)."""
        return not self._stopping and any(not task.done() for task in self._tasks)

    async def _work(self, sub: AsyncPullSubscription) -> None:
        logger = self._core.logger
        while not self._stopping:
            try:
                msgs = await sub.fetch(1, 1.0)
            except ClusterClosedError:
                return
            except (ConsumerNotFoundError, StreamNotFoundError) as exc:  # nothing more will come
                if not self._stopping:
                    logger.error("consumer %s: %s; the pool stops", self.consumer, exc)
                self._stopping = True
                return
            except NatsClusterError as exc:
                logger.warning("consumer %s: fetch failed, retrying: %s", self.consumer, exc)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                try:
                    if (hook := _tracing.HOOK) is not None:  # read once: uninstrument() may run meanwhile
                        await hook.jetstream_async(self._handler, msg, self.consumer)
                    else:
                        await self._handler(msg)
                except Exception:
                    logger.exception("consumer %s: handler failed on %r; nak", self.consumer, msg.subject)
                    self.failed += 1
                    self._core.count("js_failed")
                    ok = False
                else:
                    self.processed += 1
                    self._core.count("js_processed")
                    ok = True
                if not msg.acked:
                    try:
                        await (msg.ack() if ok else msg.nak())
                    except NatsClusterError as exc:
                        logger.warning("consumer %s: could not acknowledge: %s", self.consumer, exc)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop fetching (a fetch in progress ends within a second); let running handlers
        finish within *timeout* s, then unsubscribe. From a handler, its own worker is
        not waited for.

        :raises ClusterTimeoutError: when handlers were still running after *timeout* s.
        """
        self._stopping = True
        # Unsubscribing under a fetch in progress would leave what the server sent it
        # unacknowledged until its ack wait: the workers end first.
        # Called from a handler, its own worker is not waited for (it would only time out).
        others = [task for task in self._tasks if task is not asyncio.current_task()]
        _, pending = await asyncio.wait(others, timeout=timeout) if others else (set(), set())
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except NatsClusterError as exc:
                self._core.logger.debug("consumer %s: unsubscribe: %s", self.consumer, exc)
        if pending:
            raise ClusterTimeoutError(f"consumer {self.consumer!r}: handlers still running after {timeout:g} s")
