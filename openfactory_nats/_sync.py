"""A thread-safe, blocking facade over :class:`NatsCluster`."""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import threading
import time
import weakref
from collections.abc import Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

from ._cluster import NatsCluster
from ._errors import ClusterClosedError, ClusterTimeoutError, WrongThreadError
from ._jetstream import PubAck, check_msg_id
from ._loop import INHERITED, LoopThread, SharedLoop
from ._state import ClusterState
from ._wire import build_frame, check_timeout, frame_size, payload_bytes

__all__ = ("SyncNatsCluster",)

T = TypeVar("T")
_log = logging.getLogger("openfactory_nats")
_AT_EXIT_TIMEOUT = 5.0
_LARGE = 64 * 1024
_instances: weakref.WeakSet[SyncNatsCluster] = weakref.WeakSet()


class SyncNatsCluster:
    """Publish to one NATS cluster from ordinary blocking code, from any thread.

    The :class:`NatsCluster` core runs on a dedicated daemon thread's event loop. Every
    blocking call takes a ``timeout`` (``None`` means the instance's default) and raises
    a ``TimeoutError`` subclass when it runs out.

    :param timeout: the default timeout, in seconds, of every blocking call.
    :param options: as for :class:`NatsCluster` (``connect_timeout``, ``drain_timeout``,
        ``max_pending_bytes`` and nats-py connect options).
    """

    def __init__(
        self,
        name: str,
        servers: Sequence[str] | str,
        logger: logging.Logger,
        reconnect_time_wait: float = 2,
        *,
        timeout: float = 10.0,
        _shared_loop: SharedLoop | None = None,
        **options: Any,
    ) -> None:
        self._timeout = check_timeout(timeout)
        self._args: tuple[Any, ...] = (name, servers, logger, reconnect_time_wait)
        self._options = dict(options)
        self._core = NatsCluster(*self._args, **self._options)
        self._shared_loop = _shared_loop
        self._runner = self._new_runner()
        self._loop_ident = self._runner.thread.ident
        self._closed = False
        self._forked = False
        self._close_lock = threading.Lock()
        self._fork_lock = threading.Lock()
        _instances.add(self)

    def __repr__(self) -> str:
        return f"<SyncNatsCluster {self._core!r}>"

    def __enter__(self) -> SyncNatsCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- properties ----------------------------------------------------------------
    @property
    def name(self) -> str:
        """The logical cluster name."""
        return self._core.name

    @property
    def cluster(self) -> NatsCluster:
        """The asyncio core (use it only on :attr:`loop`)."""
        return self._core

    @property
    def loop(self) -> Any:
        """The background event loop the core runs on."""
        return self._runner.loop

    @property
    def state(self) -> ClusterState:
        """The current :class:`ClusterState`."""
        if self._closed:
            return ClusterState.CLOSED
        if self._forked:
            return ClusterState.NEW
        return self._core.state

    @property
    def is_connected(self) -> bool:
        """True while connected to a server and open."""
        return self.state is ClusterState.CONNECTED

    def stats(self) -> dict[str, int]:
        """The core's counters (see :meth:`NatsCluster.stats`)."""
        return self._core.stats()

    # -- blocking calls ------------------------------------------------------------
    def connect(self, timeout: float | None = None) -> None:
        """Connect now rather than on the first publish.

        :raises ConnectError: when the cluster could not be reached (a ``RuntimeError``).
        :raises ConnectTimeoutError: when *timeout* ran out first.
        """
        wait = self._wait(timeout)
        self._enter()
        self._call(self._core.connect(), wait, connecting=True)

    @overload
    def publish(
        self,
        subject: str,
        payload: bytes,
        timeout: float | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        ack: Literal[False] = False,
        msg_id: str | None = None,
    ) -> None: ...

    @overload
    def publish(
        self,
        subject: str,
        payload: bytes,
        timeout: float | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        ack: Literal[True],
        msg_id: str | None = None,
    ) -> PubAck: ...

    def publish(
        self,
        subject: str,
        payload: bytes,
        timeout: float | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        ack: bool = False,
        msg_id: str | None = None,
    ) -> PubAck | None:
        """Validate *payload* and queue it for *subject*.

        When this returns the message is queued for the server, as with awaiting
        nats-py's ``publish``; messages from one thread keep their order.

        With ``ack=True`` it blocks until the JetStream stream bound to *subject* has
        stored the message, and returns the :class:`PubAck`. The message carries *msg_id*
        (generated when None) as ``Nats-Msg-Id`` and is retried with it until *timeout*,
        so the stream stores it once even across timeouts and reconnections.

        :raises InvalidTypeError: for a non-str subject, a payload that is not bytes-like
            or headers that are not a mapping of str to str (a ``TypeError``).
        :raises InvalidMessageError: for an invalid subject, headers or timeout, or a
            payload over the server's ``max_payload`` (a ``ValueError``).
        :raises ConnectError: when the cluster cannot be reached (a ``RuntimeError``).
        :raises BufferFullError: when the outgoing buffer stayed full for *timeout* s.
        :raises ClusterTimeoutError: with ``ack``, when no acknowledgement came in time.
        :raises ClusterClosedError: after :meth:`close`.
        :raises WrongThreadError: on the event-loop thread.
        """
        if ack:
            return self._publish_acked(subject, payload, timeout, headers, msg_id)
        core = self._core
        if core.ready and not self._forked and threading.get_ident() != self._loop_ident:
            wait = self._timeout if timeout is None else check_timeout(timeout)
            if core._fast:
                if type(payload) is not bytes:
                    payload = payload_bytes(payload)  # copied once, here; TypeError if not bytes-like
                if len(payload) > _LARGE:
                    # Make room before copying a large payload into a frame, so that no
                    # copy waits outside the budget: the cap is on memory.
                    core.reserve(frame_size(subject, payload, headers, core._max_payload), wait)
                frame = build_frame(subject, payload, headers, core._max_payload)
                core.enqueue(frame, len(frame), wait)
            else:
                item, size = core.prepare(subject, payload, headers, core._max_payload)
                core.enqueue(item, size, wait)
            return None
        self._publish_slow(subject, payload, timeout, headers)
        return None

    def _publish_acked(
        self, subject: str, payload: bytes, timeout: float | None, headers: Mapping[str, str] | None, msg_id: str | None
    ) -> PubAck:
        wait = self._wait(timeout)
        self._enter()
        core = self._core
        core.prepare(subject, payload, headers, core.max_payload if core.state is not ClusterState.NEW else 1 << 26)
        if msg_id is not None:
            check_msg_id(msg_id)
        coro = core.publish(subject, payload, headers=headers, timeout=wait, ack=True, msg_id=msg_id)
        return self._call(coro, wait + 1.0)

    def _publish_slow(self, subject: object, payload: object, timeout: float | None, headers: object) -> None:
        wait = self._wait(timeout)
        self._enter()
        core = self._core
        deadline = time.monotonic() + wait
        limit = core.max_payload if core.state is not ClusterState.NEW else 64 * 1024 * 1024
        core.prepare(subject, payload, headers, limit)  # refuse bad input before connecting
        if not core.ready:
            self._call(core.connect(), wait, connecting=True)
        item, size = core.prepare(subject, payload, headers, core.max_payload)
        core.enqueue(item, size, max(0.0, deadline - time.monotonic()))

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything queued so far has reached the server (PING/PONG).

        :raises ClusterTimeoutError: when that did not happen within *timeout* s.
        """
        wait = self._wait(timeout)
        self._enter()
        # The core keeps the deadline itself; the margin lets its clearer error through.
        self._call(self._core.flush(wait), wait + 1.0)

    def close(self, timeout: float | None = None) -> None:
        """Drain (bounded), close, stop the loop and join its thread.

        Idempotent and safe from many threads at once; every other call raises
        :class:`ClusterClosedError` afterwards.
        """
        wait = self._wait(timeout)
        if self._runner.in_loop_thread():
            raise WrongThreadError("This method cannot be called from the event loop thread", cluster=self.name)
        deadline = time.monotonic() + wait
        if not self._close_lock.acquire(timeout=wait + 2 * self._core.drain_timeout + 5):
            raise ClusterTimeoutError(f"cluster {self.name!r}: another close() did not finish", cluster=self.name)
        try:
            if self._closed:
                return
            self._closed = True
            _instances.discard(self)
            if self._forked:
                return  # what the child inherited belongs to the parent
            future = self._runner.submit(self._core.close())
            try:
                future.result(wait)
            except concurrent.futures.TimeoutError:
                future.cancel()
                self._core.logger.warning("cluster %s: close did not finish within %g s", self.name, wait)
            finally:
                if self._shared_loop is None:
                    self._runner.stop(max(1.0, deadline - time.monotonic()))
        finally:
            self._close_lock.release()

    # -- helpers -------------------------------------------------------------------
    def _wait(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else check_timeout(timeout)

    def _enter(self) -> None:
        if self._forked:
            self._renew_after_fork()
        if self._closed:
            raise ClusterClosedError(f"cluster {self.name!r} is closed", cluster=self.name)
        if self._runner.in_loop_thread():
            raise WrongThreadError("This method cannot be called from the event loop thread", cluster=self.name)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float, *, connecting: bool = False) -> T:
        future = self._runner.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done() and not future.cancelled():
                return future.result(0)  # the coroutine's own outcome, a timeout of ours included
            future.cancel()
            if connecting:
                raise self._core.connect_timeout_error(timeout) from None
            raise ClusterTimeoutError(
                f"cluster {self.name!r}: no answer within {timeout:g} s", cluster=self.name
            ) from None

    def _new_runner(self) -> LoopThread:
        if self._shared_loop is not None:
            return self._shared_loop.current()
        return LoopThread(f"openfactory-nats-{self._args[0]}")

    def _after_fork_in_child(self) -> None:
        self._forked = True
        self._close_lock = threading.Lock()
        self._fork_lock = threading.Lock()

    def _renew_after_fork(self) -> None:
        with self._fork_lock:
            if not self._forked:
                return
            INHERITED.append((self._runner, self._core))
            if not self._closed:
                self._core = NatsCluster(*self._args, **self._options)
                self._runner = self._new_runner()
                self._loop_ident = self._runner.thread.ident
            self._forked = False

    def _close_at_exit(self) -> None:
        if self._closed or self._forked:
            return
        try:
            self.close(timeout=min(self._timeout, _AT_EXIT_TIMEOUT))
        except Exception:
            _log.exception("closing cluster %s at exit failed", self.name)


def _after_fork_in_child() -> None:
    for instance in list(_instances):
        instance._after_fork_in_child()


def _close_all_at_exit() -> None:
    for instance in list(_instances):
        instance._close_at_exit()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)
