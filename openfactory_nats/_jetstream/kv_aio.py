"""The key-value store for asyncio code (``await js.key_value(bucket)`` on
:class:`~openfactory_nats.AsyncJetStream`): the blocking :class:`KeyValue`'s calls as
coroutines, on the same payloads and the same ordered consumer."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from .._errors import (
    ClusterClosedError,
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
from .._receive.subscription import AsyncSubscription
from .._wire import check_timeout
from . import api, kv, kv_write
from .kv import DEL, OP_HEADER, PURGE, ROLLUP_HEADER, Entry, Step, WatchState

__all__ = ("AsyncKeyValue", "AsyncWatch")

AsyncCallback = Callable[[Entry], Awaitable[object]]
_TICK = 1.0


class Core(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def logger(self) -> logging.Logger: ...

    def counter(self, key: str) -> int: ...

    async def publish(self, subject: str, payload: bytes) -> None: ...

    async def request(
        self, subject: str, payload: bytes = b"", timeout: float = 10.0, *, headers: Mapping[str, str] | None = None
    ) -> Msg: ...

    async def subscribe(self, subject: str) -> AsyncSubscription: ...


class AsyncKeyValue:
    """A key-value bucket for asyncio code: the calls of the blocking
    :class:`~openfactory_nats.KeyValue`, as coroutines."""

    def __init__(self, core: Core, bucket: str, timeout: float, direct: bool = True) -> None:
        self._core = core
        self.bucket = kv.check_bucket(bucket)
        self.stream = kv.stream_name(bucket)
        self._prefix = kv.prefix(bucket)
        self._timeout = timeout
        self._direct = direct

    def __repr__(self) -> str:
        return f"<AsyncKeyValue bucket={self.bucket!r} cluster={self._core.name!r}>"

    def _wait(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else check_timeout(timeout)

    async def _request(
        self, subject: str, payload: bytes, wait: float, headers: Mapping[str, str] | None = None
    ) -> Msg:
        try:
            return await self._core.request(subject, payload, wait, headers=headers)
        except NoRespondersError:
            name = self._core.name
            raise JetStreamError(
                f"cluster {name!r}: bucket {self.bucket!r}: no JetStream answered", cluster=name, code=503
            ) from None

    async def _write(
        self, key: str, value: bytes, headers: dict[str, str] | None, last: int | None, wait: float
    ) -> int:
        headers = kv_write.write_headers(headers, last)
        reply = await self._request(self._prefix + key, value, wait, headers)
        try:
            return kv.read_pub_ack(reply.data, self.bucket, key, last, self._core.name)
        except RevisionMismatchError:
            if headers is None or kv.MSG_ID not in headers:
                raise
            try:  # the conflict may be our own write, sent again after a lost connection
                subject, query = kv_write.last_query(self.bucket, key)
                got: Msg | None = await self._request(subject, query, wait)
            except NatsClusterError:
                got = None
            revision = None if got is None else kv_write.written_by(got.data, headers[kv.MSG_ID])
            if revision is None:
                raise
            return revision

    async def put(self, key: str, value: bytes, timeout: float | None = None) -> int:
        kv.check_key(key)
        return await self._write(key, kv.check_value(value), None, None, self._wait(timeout))

    async def create(self, key: str, value: bytes, timeout: float | None = None) -> int:
        kv.check_key(key)
        data = kv.check_value(value)
        wait = self._wait(timeout)
        try:
            return await self._write(key, data, None, 0, wait)
        except KeyExistsError:
            try:
                await self.get(key, timeout=wait)
            except KeyNotFoundError as gone:
                if not gone.revision:
                    raise
                try:
                    return await self._write(key, data, None, gone.revision, wait)
                except RevisionMismatchError as exc:  # another writer came first
                    raise kv_write.key_exists(exc) from None
            raise

    async def update(self, key: str, value: bytes, last: int, timeout: float | None = None) -> int:
        kv.check_key(key)
        return await self._write(key, kv.check_value(value), None, kv.check_revision(last), self._wait(timeout))

    async def delete(self, key: str, last: int | None = None, timeout: float | None = None) -> int:
        kv.check_key(key)
        if last is not None:
            kv.check_revision(last)
        return await self._write(key, b"", {OP_HEADER: DEL}, last, self._wait(timeout))

    async def purge(self, key: str, timeout: float | None = None) -> int:
        kv.check_key(key)
        return await self._write(key, b"", {OP_HEADER: PURGE, ROLLUP_HEADER: "sub"}, None, self._wait(timeout))

    async def get(self, key: str, revision: int | None = None, timeout: float | None = None) -> Entry:
        kv.check_key(key)
        wait = self._wait(timeout)
        name = self._core.name
        subject = self._prefix + key
        if revision is None and self._direct:
            try:
                reply = await self._core.request(f"{api.API}DIRECT.GET.{self.stream}.{subject}", b"", wait)
            except NoRespondersError:
                raise kv.not_found(self.bucket, name) from None
            return kv.entry_from_direct(self.bucket, key, reply, name)
        query: dict[str, Any] = {"last_by_subj": subject} if revision is None else {"seq": kv.check_revision(revision)}
        reply = await self._request(f"{api.API}STREAM.MSG.GET.{self.stream}", json.dumps(query).encode(), wait)
        return kv.entry_from_get(self.bucket, key, reply.data, name)

    async def keys(self, keys: str = ">", timeout: float | None = None) -> list[str]:
        w = await self.watch(keys, ignore_deletes=True, headers_only=True, timeout=timeout)
        try:
            await w.wait_caught_up(self._wait(timeout))
            return sorted({e.key for e in w._drain()})
        finally:
            await w.stop()

    async def history(self, key: str, timeout: float | None = None) -> list[Entry]:
        kv.check_key(key)
        w = await self.watch(key, include_history=True, timeout=timeout)
        try:
            await w.wait_caught_up(self._wait(timeout))
            return w._drain()
        finally:
            await w.stop()

    async def watch(
        self,
        keys: str = ">",
        callback: AsyncCallback | None = None,
        *,
        include_history: bool = False,
        ignore_deletes: bool = False,
        updates_only: bool = False,
        headers_only: bool = False,
        timeout: float | None = None,
    ) -> AsyncWatch:
        """As the blocking :meth:`KeyValue.watch <openfactory_nats.KeyValue.watch>`, with
        an ``async`` *callback* (awaited in revision order) or ``async for``."""
        kv.check_key(keys, wildcards=True)
        if callback is not None and not callable(callback):
            raise InvalidTypeError(f"callback must be callable, not {type(callback).__name__}")
        state = WatchState(self.bucket, keys, include_history, ignore_deletes, updates_only, headers_only)
        watch = AsyncWatch(self._core, state, callback, self._wait(timeout))
        await watch._start()
        return watch


class AsyncWatch:
    """A running watch for asyncio code: one task reads the ordered consumer."""

    def __init__(self, core: Core, state: WatchState, callback: AsyncCallback | None, wait: float) -> None:
        self._core = core
        self._state = state
        self._callback = callback
        self._timeout = wait
        self._entries: deque[Entry] = deque()
        self._ready = asyncio.Event()
        self._caught = asyncio.Event()
        #: Set once the reading task ended (stop(), or the cluster closed).
        self._ended = asyncio.Event()
        self._stopped = False
        self._sub: AsyncSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._reconnects = core.counter("reconnects")
        self.errors = 0
        self.resets = 0

    def __repr__(self) -> str:
        return f"<AsyncWatch bucket={self._state.bucket!r} keys={self._state.keys!r} revision={self._state.last}>"

    @property
    def caught_up(self) -> bool:
        return self._caught.is_set()

    @property
    def revision(self) -> int:
        return self._state.last

    async def _start(self) -> None:
        try:
            await self._create(self._timeout)
        except BaseException as exc:
            if self._sub is not None:
                await self._sub.unsubscribe()
            if not isinstance(exc, JetStreamError):
                self._stale(self._state.consumer)  # it may exist all the same
            raise
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _create(self, wait: float) -> None:
        subject, payload = self._state.next_consumer()
        sub = await self._core.subscribe(self._state.inbox)
        old, self._sub = self._sub, sub
        if old is not None:
            await old.unsubscribe()
        try:
            reply = await self._core.request(subject, payload, wait)
            body = api.parse_reply(reply.data, self._core.name, "watch")
        except NoRespondersError:
            raise JetStreamError(f"watch {self._state.bucket}: no JetStream answered", code=503) from None
        except StreamNotFoundError as exc:
            raise kv.not_found(self._state.bucket, self._core.name, exc) from None
        if self._state.created(body):
            self._caught.set()
            self._ready.set()

    async def _run(self) -> None:
        try:
            await self._follow()
        finally:  # stopped, or the cluster closed: readers are told once the queue is empty
            self._ended.set()
            self._ready.set()

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        seen = loop.time()
        broken = False
        while not self._stopped:
            reconnects = self._core.counter("reconnects")
            if broken or reconnects != self._reconnects or loop.time() - seen > 3 * kv.HEARTBEAT:
                self._reconnects = reconnects
                self.resets += 1
                self._stale(self._state.consumer)
                try:
                    await self._create(min(self._timeout, 5.0))
                    broken = False
                except ClusterClosedError:
                    return
                except NatsClusterError as exc:
                    broken = True
                    self._core.logger.debug("watch %s: consumer not made yet (%s)", self._state.bucket, exc)
                    await asyncio.sleep(_TICK)
                seen = loop.time()
                continue
            assert self._sub is not None
            try:
                msg = await self._sub.next_msg(_TICK)
            except ClusterTimeoutError:
                continue
            except SubscriptionClosedError:
                if self._stopped:
                    return
                broken = True
                continue
            step, value = self._state.read(msg)
            if step is Step.IGNORE:
                continue
            seen = loop.time()
            if step is Step.FLOW:
                try:
                    await self._core.publish(value, b"")
                except NatsClusterError as exc:
                    self._core.logger.debug("watch %s: flow control not answered: %s", self._state.bucket, exc)
            elif step is Step.RESET:
                broken = True
            elif step is Step.DELIVER and value is not None:
                if self._callback is None:
                    self._entries.append(value)
                    self._ready.set()
                else:
                    try:
                        await self._callback(value)
                    except Exception:
                        self.errors += 1
                        self._core.logger.exception("watch %s: callback failed on %r", self._state.bucket, value.key)
            if self._state.caught_up and not self._caught.is_set():
                self._caught.set()
                self._ready.set()

    def _stale(self, consumer: str) -> None:
        subject = f"{api.API}CONSUMER.DELETE.{self._state.stream}.{consumer}"

        async def delete() -> None:
            try:
                await self._core.request(subject, b"", 2.0)
            except NatsClusterError:
                pass  # an ephemeral consumer without interest goes away on its own

        asyncio.get_running_loop().create_task(delete())

    async def wait_caught_up(self, timeout: float | None = None) -> None:
        """:raises ClusterTimeoutError: when not caught up within *timeout* s.
        :raises SubscriptionClosedError: when the watch ended first (stopped, or its
            cluster closed)."""
        wait = self._timeout if timeout is None else check_timeout(timeout)
        if not self._caught.is_set():
            waits = [asyncio.ensure_future(self._caught.wait()), asyncio.ensure_future(self._ended.wait())]
            try:
                await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
        if self._caught.is_set():
            return
        if self._ended.is_set() or self._stopped:
            raise SubscriptionClosedError(f"watch {self._state.bucket}/{self._state.keys} ended")
        raise ClusterTimeoutError(
            f"watch {self._state.bucket}/{self._state.keys}: not caught up within {wait:g} s",
            cluster=self._core.name,
        )

    async def next(self, timeout: float | None = None) -> Entry:
        """The next entry, as the blocking :meth:`Watch.next <openfactory_nats.Watch.next>`.

        :raises ClusterTimeoutError, SubscriptionClosedError, SubscriptionModeError: as it does.
        """
        if self._callback is not None:
            raise SubscriptionModeError("next() on a watch with a callback")
        wait = self._timeout if timeout is None else check_timeout(timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not self._entries:
            if self._stopped or self._ended.is_set():
                raise SubscriptionClosedError(f"watch {self._state.bucket}/{self._state.keys} ended")
            self._ready.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise ClusterTimeoutError(f"watch {self._state.bucket}/{self._state.keys}: no entry within {wait:g} s")
            try:
                await asyncio.wait_for(self._ready.wait(), left)
            except TimeoutError:
                pass
        return self._entries.popleft()

    def __aiter__(self) -> AsyncIterator[Entry]:
        return self

    async def __anext__(self) -> Entry:
        while True:
            try:
                return await self.next(3600.0)
            except ClusterTimeoutError:
                continue
            except SubscriptionClosedError:
                raise StopAsyncIteration from None

    def _drain(self) -> list[Entry]:
        got = list(self._entries)
        self._entries.clear()
        return got

    async def stop(self) -> None:
        """Stop the watch (idempotent); ``async for`` ends once the queue is empty."""
        if self._stopped:
            return
        self._stopped = True
        self._ready.set()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._sub is not None:
            await self._sub.unsubscribe()
        self._stale(self._state.consumer)
