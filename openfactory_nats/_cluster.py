"""The asyncio core: one nats-py connection to one NATS cluster."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from typing import Any

import nats.errors
from nats.aio.client import Client

from . import _natsio
from ._errors import (
    BufferFullError,
    ClusterClosedError,
    ClusterTimeoutError,
    ClusterUnavailableError,
    ConnectError,
    ConnectTimeoutError,
    InvalidMessageError,
    InvalidTypeError,
    map_nats_error,
)
from ._outbox import Outbox
from ._redact import redact, redact_url
from ._state import ClusterState
from ._wire import build_frame, check_timeout, payload_bytes

__all__ = ("DEFAULT_MAX_PENDING_BYTES", "NatsCluster")

DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024
_DEFAULT_MAX_PAYLOAD = 1024 * 1024
_CALLBACKS = ("error_cb", "disconnected_cb", "reconnected_cb", "closed_cb", "discovered_server_cb", "lame_duck_mode_cb")
_RESERVED = ("servers", "allow_reconnect", "max_reconnect_attempts", "pending_size")
_POLL_INTERVAL = 0.002
_HIGH_WATER = 4 * 1024 * 1024  # most bytes handed to nats-py and not yet on the socket
_PING_PATIENCE = 3600.0  # see NatsCluster._ping
_STAT_KEYS = ("published", "bytes", "errors", "reconnects", "disconnects", "dropped", "dropped_bytes", "refused")

Item = Any  # a frame (fast path) or a (subject, payload, headers) tuple (public-API path)


def _is_auth_failure(exc: BaseException) -> bool:
    """True for the server refusing our credentials; nats-py 2.16 reports that as a plain
    ``nats.errors.Error`` during the first connection."""
    text = str(exc).lower()
    return (
        isinstance(exc, nats.errors.AuthorizationError)
        or "authorization violation" in text
        or ("authentication" in text and ("expired" in text or "timeout" in text or "fail" in text))
    )


class NatsCluster:
    """Wrapper around one connection to a NATS cluster, for asyncio code.

    :param name: logical cluster name, used in logs and errors (e.g. ``"C1"``).
    :param servers: server URLs of the cluster (a single URL string is accepted too).
    :param logger: the logger that receives every connection and publish event.
    :param reconnect_time_wait: seconds between reconnect attempts.
    :param connect_timeout: one overall deadline, in seconds, for :meth:`connect`.
    :param drain_timeout: the bound, in seconds, on the drain done by :meth:`close`.
    :param max_pending_bytes: the most bytes accepted but not yet written to the socket
        (queued here, in nats-py's buffer and in the transport), reconnect buffer included.
    :param options: passed on to ``nats.connect`` (``tls``, ``user``, ``password``,
        ``token``, ``user_credentials``, ``nkeys_seed``, ``ping_interval``, ...). Callbacks
        given here are called after the library's own.
    """

    def __init__(
        self,
        name: str,
        servers: Sequence[str] | str,
        logger: logging.Logger,
        reconnect_time_wait: float = 2,
        *,
        connect_timeout: float = 5.0,
        drain_timeout: float = 5.0,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        **options: Any,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidTypeError("name must be a non-empty str", cluster=None)
        urls = [servers] if isinstance(servers, str) else list(servers)
        if not urls or not all(isinstance(u, str) and u.strip() for u in urls):
            raise InvalidMessageError(f"cluster {name!r}: servers must be non-empty URL strings", cluster=name)
        if isinstance(max_pending_bytes, bool) or not isinstance(max_pending_bytes, int) or max_pending_bytes <= 0:
            raise InvalidMessageError(f"cluster {name!r}: max_pending_bytes must be a positive int", cluster=name)
        for key in _RESERVED:
            if key in options:
                raise InvalidMessageError(f"cluster {name!r}: option {key!r} is managed by the library", cluster=name)
        self.name = name
        self.servers = [u.strip() for u in urls]
        self.logger = logger
        self.reconnect_time_wait = check_timeout(reconnect_time_wait, "reconnect_time_wait")
        self.connect_timeout = check_timeout(connect_timeout, "connect_timeout")
        self.drain_timeout = check_timeout(drain_timeout, "drain_timeout")
        self.max_pending_bytes = max_pending_bytes
        self.nc: Client | None = None
        self._lock = asyncio.Lock()
        self._user_callbacks = {key: options.pop(key) for key in _CALLBACKS if key in options}
        self._options = options
        self._fast = _natsio.supports_fast_path()
        # Up to the high-water mark of bytes sits in nats-py's buffer and the transport;
        # writing it to the socket briefly copies it twice more. The budget of the queue
        # leaves room for that, so that the whole stays within max_pending_bytes.
        self._high_water = max(1024, min(_HIGH_WATER, max_pending_bytes // 16))
        self._outbox: Outbox[Item] = Outbox(
            max_pending_bytes - 2 * self._high_water, self._wake, name, limit=max_pending_bytes
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._max_payload = _DEFAULT_MAX_PAYLOAD
        self._in_flight = 0
        self._pump_task: asyncio.Task[None] | None = None
        self._pings: set[asyncio.Task[None]] = set()
        self._feeder: asyncio.Task[None] | None = None
        self._poll_handle: asyncio.TimerHandle | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._connecting = False
        self._closing = False
        self._closed = False
        self._ever_connected = False
        self._stats = dict.fromkeys(_STAT_KEYS, 0)
        self._stats_lock = threading.Lock()
        #: True while a client exists that accepts messages (connected or reconnecting).
        self.ready = False

    def __repr__(self) -> str:
        servers = ", ".join(redact_url(u) for u in self.servers)
        return f"<NatsCluster {self.name!r} [{servers}] {self.state.value}>"

    # -- state ---------------------------------------------------------------------
    @property
    def state(self) -> ClusterState:
        """The current :class:`ClusterState`."""
        if self._closed:
            return ClusterState.CLOSED
        if self._closing:
            return ClusterState.CLOSING
        nc = self.nc
        if nc is not None and not nc.is_closed:
            if nc.is_connected:
                return ClusterState.CONNECTED
            if nc.is_reconnecting or nc.is_connecting:
                return ClusterState.RECONNECTING
            return ClusterState.CLOSING
        if self._connecting:
            return ClusterState.CONNECTING
        return ClusterState.DISCONNECTED if self._ever_connected else ClusterState.NEW

    @property
    def is_connected(self) -> bool:
        """True while connected to a server and open."""
        return self.state is ClusterState.CONNECTED

    @property
    def max_payload(self) -> int:
        """The server's ``max_payload`` (1 MiB until the first connection)."""
        return self._max_payload

    def stats(self) -> dict[str, int]:
        """Counters since construction.

        ``published`` messages and their ``bytes`` (protocol frames) handed to the client;
        ``errors`` reported by the client; ``reconnects``; ``disconnects``; ``dropped``
        messages and ``dropped_bytes`` that could not be delivered (each loss is also
        logged at ERROR); ``refused`` messages (buffer full); and two gauges: ``queued``
        messages not yet handed to the client and ``unsent_bytes`` handed to it but not
        yet written to the socket.
        """
        with self._stats_lock:
            result = dict(self._stats)
        result["queued"] = len(self._outbox)
        result["unsent_bytes"] = self._in_flight
        return result

    def _count(self, key: str, amount: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += amount

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise ClusterClosedError(f"cluster {self.name!r} is closed", cluster=self.name)

    def _client_usable(self) -> bool:
        nc = self.nc
        return nc is not None and not nc.is_closed and not nc.is_draining

    # -- connecting ----------------------------------------------------------------
    async def connect(self) -> None:
        """Connect, unless a client exists that is connected or reconnecting.

        One attempt runs at a time; the whole call, waiting for another caller's attempt
        included, is bounded by ``connect_timeout``.

        :raises ConnectTimeoutError: when no server answered within ``connect_timeout``.
        :raises ConnectError: when the connection was refused (for example bad credentials).
        :raises ClusterClosedError: after :meth:`close`.
        """
        self._check_open()
        if self._client_usable():
            return
        loop = asyncio.get_running_loop()
        self._bind(loop)
        deadline = loop.time() + self.connect_timeout
        try:
            await asyncio.wait_for(self._lock.acquire(), self.connect_timeout)
        except TimeoutError:
            raise self.connect_timeout_error() from None
        try:
            self._check_open()
            if not self._client_usable():
                self._connecting = True
                await self._open_client(deadline)
        finally:
            self._connecting = False
            self._lock.release()
        self._on_wake()

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:
            self._loop = loop
            self._loop_thread = threading.current_thread()

    def connect_timeout_error(self, timeout: float | None = None) -> ConnectTimeoutError:
        """The error for a connection not made within *timeout* s (``connect_timeout``)."""
        servers = ", ".join(redact_url(u) for u in self.servers)
        seconds = self.connect_timeout if timeout is None else timeout
        return ConnectTimeoutError(
            f"cluster {self.name!r}: could not connect to [{servers}] within {seconds:g} s", cluster=self.name
        )

    async def _open_client(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        nc = Client()
        refused: asyncio.Future[BaseException] = loop.create_future()
        callbacks = self._callbacks_for(nc, refused)
        options: dict[str, Any] = {
            "name": self.name,
            "ping_interval": 10,
            "flush_timeout": self.connect_timeout,
            **self._options,
        }
        task = loop.create_task(
            nc.connect(
                servers=self.servers,
                reconnect_time_wait=self.reconnect_time_wait,  # type: ignore[arg-type]  # floats are fine
                connect_timeout=self.connect_timeout,  # type: ignore[arg-type]
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                pending_size=self.max_pending_bytes,
                **callbacks,
                **options,
            )
        )
        waiting: set[asyncio.Future[Any]] = {task, refused}
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            self._abandon(nc, task)  # the caller gave up: leave no connection attempt behind
            raise
        finally:
            refused.cancel()
        if task not in done:
            self._abandon(nc, task)
            await asyncio.wait({task}, timeout=0.5)
            if refused.done() and not refused.cancelled():
                raise ConnectError(
                    f"cluster {self.name!r}: connection refused: {redact(str(refused.result()))}",
                    cluster=self.name,
                ) from refused.result()
            raise self.connect_timeout_error()
        exc = task.exception()
        if exc is not None:
            self._abandon(nc, task)
            raise ConnectError(
                f"cluster {self.name!r}: could not connect: {redact(str(exc))}", cluster=self.name
            ) from exc
        self.nc = nc
        self._max_payload = nc.max_payload or _DEFAULT_MAX_PAYLOAD
        self._in_flight = 0
        self._ever_connected = True
        self.ready = True
        self.logger.info("cluster %s: connected to %s", self.name, self._server_of(nc))

    @staticmethod
    def _abandon(nc: Client, task: asyncio.Task[None]) -> None:
        task.cancel()
        _natsio.abort_transport(nc)

    def _server_of(self, nc: Client) -> str:
        url = nc.connected_url
        return redact_url(url.geturl()) if url is not None else "?"

    def _callbacks_for(self, nc: Client, refused: asyncio.Future[BaseException]) -> dict[str, Any]:
        user = self._user_callbacks

        async def chain(key: str, *args: Any) -> None:
            callback = user.get(key)
            if callback is not None:
                try:
                    await callback(*args)
                except Exception:
                    self.logger.exception("cluster %s: %s raised", self.name, key)

        async def error_cb(exc: Exception) -> None:
            self._count("errors")
            if _is_auth_failure(exc) and not refused.done():
                refused.set_result(exc)
            self.logger.warning("cluster %s: error: %s", self.name, redact(str(exc) or type(exc).__name__))
            await chain("error_cb", exc)

        async def disconnected_cb() -> None:
            if nc is self.nc and not self._closing:
                self._count("disconnects")
                self.logger.warning("cluster %s: disconnected; buffering until reconnected", self.name)
            await chain("disconnected_cb")

        async def reconnected_cb() -> None:
            self._count("reconnects")
            self._cancel_pings()  # nats-py dropped their PONG futures when it reconnected
            self._max_payload = nc.max_payload or self._max_payload
            self.logger.info("cluster %s: reconnected to %s", self.name, self._server_of(nc))
            self._on_wake()  # send what waited during the outage
            await chain("reconnected_cb")

        async def closed_cb() -> None:
            if nc is self.nc and not self._closing:
                self.ready = False
                self._lose_in_flight("nats-py closed the connection for good")
                self.logger.error("cluster %s: connection closed by the client; will reconnect on next use", self.name)
            await chain("closed_cb")

        async def discovered_server_cb() -> None:
            self.logger.info(
                "cluster %s: discovered servers %s", self.name, [redact_url(s.geturl()) for s in nc.discovered_servers]
            )
            await chain("discovered_server_cb")

        async def lame_duck_mode_cb() -> None:
            self.logger.warning("cluster %s: server %s entered lame-duck mode", self.name, self._server_of(nc))
            await chain("lame_duck_mode_cb")

        return {
            "error_cb": error_cb,
            "disconnected_cb": disconnected_cb,
            "reconnected_cb": reconnected_cb,
            "closed_cb": closed_cb,
            "discovered_server_cb": discovered_server_cb,
            "lame_duck_mode_cb": lame_duck_mode_cb,
        }

    # -- publishing ----------------------------------------------------------------
    def prepare(self, subject: object, payload: object, headers: object, max_payload: int) -> tuple[Item, int]:
        """Validate a message and return the item to queue and its size in bytes.

        Safe to call from any thread.
        """
        frame = build_frame(subject, payload, headers, max_payload)
        if self._fast:
            return frame, len(frame)
        copied = dict(headers) if isinstance(headers, Mapping) else None
        return (subject, payload_bytes(payload), copied, len(frame)), len(frame)

    def reserve(self, size: int, timeout: float) -> None:
        """Wait (any thread but the loop's) until a message of *size* bytes fits.

        :raises BufferFullError: when the outgoing buffer stayed full for *timeout* s.
        """
        try:
            self._outbox.reserve(size, timeout)
        except BufferFullError:
            self._count("refused")
            raise

    def enqueue(self, item: Item, size: int, timeout: float) -> None:
        """Queue a prepared message from any thread, waiting up to *timeout* for room.

        :raises BufferFullError: when the outgoing buffer stayed full for *timeout* s.
        """
        try:
            self._outbox.put(item, size, timeout)
        except BufferFullError:
            self._count("refused")
            raise

    async def publish(
        self, subject: str, payload: bytes, *, headers: Mapping[str, str] | None = None, timeout: float = 0.0
    ) -> None:
        """Validate and queue one message for the server.

        When this returns the message is queued in the client, as with nats-py's own
        ``publish``; while reconnecting it waits in the reconnect buffer.

        :raises InvalidTypeError: for a non-str subject or a payload that is not bytes-like.
        :raises InvalidMessageError: for an invalid subject or headers, or a payload over
            the server's ``max_payload``.
        :raises ConnectError: when the cluster cannot be reached (lazy connect).
        :raises BufferFullError: when the outgoing buffer is full for longer than
            *timeout* seconds (0, the default, refuses at once).
        :raises ClusterClosedError: after :meth:`close`.
        """
        self._check_open()
        wait = check_timeout(timeout)
        limit = self._max_payload if self._ever_connected else 64 * 1024 * 1024
        item, size = self.prepare(subject, payload, headers, limit)
        if not self._client_usable():
            await self.connect()
            item, size = self.prepare(subject, payload, headers, self._max_payload)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            try:
                self._outbox.put(item, size, 0.0)
                break
            except BufferFullError:
                if loop.time() >= deadline:
                    self._count("refused")
                    raise
                self._on_wake()
                await asyncio.sleep(_POLL_INTERVAL)
        self._on_wake()

    def _wake(self) -> None:
        """Ask the loop to move queued messages into the client (any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            if threading.current_thread() is self._loop_thread:
                loop.call_soon(self._on_wake)
            else:
                loop.call_soon_threadsafe(self._on_wake)

    def _on_wake(self) -> None:
        nc = self.nc
        if nc is None or not self._client_usable():
            self._outbox.scheduled = False
            return
        if self._fast:
            if nc.is_connected:
                # Keep nats-py's buffer and the transport's small: what does not fit waits
                # here, budgeted, instead of being copied into ever larger socket writes.
                room = self._high_water - _natsio.buffered_bytes(nc)
                frames = self._outbox.take(room) if room > 0 else []
                if frames:
                    nbytes = sum(map(len, frames))
                    _natsio.append_frames(nc, frames, nbytes)
                    self._in_flight += nbytes
                    with self._stats_lock:
                        self._stats["published"] += len(frames)
                        self._stats["bytes"] += nbytes
                if len(self._outbox) and (self._feeder is None or self._feeder.done()):
                    self._feeder = asyncio.get_running_loop().create_task(self._feed(nc))
            else:
                # Reconnecting: messages wait here, in order, until reconnected_cb wakes us.
                self._outbox.scheduled = False
            self._reconcile(nc)
        elif self._pump_task is None or self._pump_task.done():
            self._pump_task = asyncio.get_running_loop().create_task(self._pump_public(nc))

    async def _pump_public(self, nc: Client) -> None:
        while len(self._outbox) and nc is self.nc and self._client_usable():
            for subject, payload, headers, size in self._outbox.take():
                try:
                    await nc.publish(subject, payload, headers=headers)
                except Exception as exc:
                    self._count("dropped")
                    self._count("dropped_bytes", len(payload))
                    self.logger.error(
                        "cluster %s: message to %s dropped: %s", self.name, subject, map_nats_error(exc, self.name)
                    )
                else:
                    self._count("published")
                    self._count("bytes", len(payload))
                self._outbox.release(size)

    def _reconcile(self, nc: Client) -> None:
        """Return the budget of bytes that have left the process; poll while producers wait
        or messages wait for room in the transport."""
        held = _natsio.buffered_bytes(nc)
        if held < self._in_flight:
            self._outbox.release(self._in_flight - held)
            self._in_flight = held
        if self._outbox.waiters and self._poll_handle is None and self._loop is not None:
            self._poll_handle = self._loop.call_later(_POLL_INTERVAL, self._poll)

    async def _feed(self, nc: Client) -> None:
        """Move queued messages into the client as the socket takes them (event-driven:
        the transport's flow control wakes it, there is no polling)."""
        backlog = -1
        while len(self._outbox) and nc is self.nc and nc.is_connected:
            await asyncio.sleep(0)  # let nats-py's flusher write what it holds
            try:
                await _natsio.wait_writable(nc)
            except Exception:
                return  # the connection is going; reconnected_cb resumes the feeding
            held = _natsio.buffered_bytes(nc)
            if held == backlog:  # the flusher made no progress: don't spin
                await asyncio.sleep(_POLL_INTERVAL)
            backlog = held
            self._on_wake()

    def _poll(self) -> None:
        self._poll_handle = None
        self._on_wake()

    def _lose_in_flight(self, why: str) -> None:
        lost, self._in_flight = self._in_flight, 0
        self._outbox.release(lost)
        if lost:
            self._count("dropped_bytes", lost)
            self.logger.error("cluster %s: %s; %d buffered bytes were dropped", self.name, why, lost)

    # -- flushing and closing ------------------------------------------------------
    async def flush(self, timeout: float = 10.0) -> None:
        """Write everything queued so far and wait for the server to confirm (PING/PONG).

        While reconnecting it waits for the reconnection, since a PONG from before the
        outage proves nothing about buffered messages.

        :raises ClusterTimeoutError: when that did not happen within *timeout* seconds.
        :raises ClusterClosedError: after :meth:`close`.
        """
        self._check_open()
        await self._flush(check_timeout(timeout))

    async def _flush(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not self._client_usable():
            if not len(self._outbox) and self.nc is None:
                return
            await self.connect()
        while True:
            nc = self.nc
            if nc is None or not self._client_usable():
                raise ClusterUnavailableError(f"cluster {self.name!r}: connection lost during flush", cluster=self.name)
            await self._pump_all(nc, deadline)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ClusterTimeoutError(
                    f"cluster {self.name!r}: flush did not complete within {timeout:g} s", cluster=self.name
                )
            if nc.is_connected:
                reconnects = self._stats["reconnects"]
                if self._fast:
                    _natsio.write_pending_now(nc)
                    rounds = 1
                else:
                    rounds = 2  # the first PING may overtake publishes still pending
                answered = True
                for _ in range(rounds):
                    answered = await self._ping(nc, deadline - loop.time())
                    if not answered:
                        break
                if answered and reconnects == self._stats["reconnects"] and nc.is_connected:
                    self._reconcile(nc)
                    return
            await asyncio.sleep(0.01)

    async def _pump_all(self, nc: Client, deadline: float) -> None:
        """Hand everything queued so far to the client, by *deadline* (loop time)."""
        loop = asyncio.get_running_loop()
        while nc.is_connected and loop.time() < deadline:
            self._on_wake()
            if self._pump_task is not None and not self._pump_task.done():
                await self._bounded(asyncio.shield(self._pump_task), deadline - loop.time())
            if not len(self._outbox):
                return
            await asyncio.sleep(_POLL_INTERVAL)

    async def _ping(self, nc: Client, timeout: float) -> bool:
        """One PING/PONG round trip; False when no PONG came within *timeout* s.

        A late PING is left running rather than cancelled: nats-py 2.16 keeps a cancelled
        PONG future in its queue, and the PONG that finally arrives then kills its read loop
        (InvalidStateError). Orphaned pings are cancelled on reconnect and on close.
        """
        ping = asyncio.get_running_loop().create_task(nc.flush(timeout=_PING_PATIENCE))  # type: ignore[arg-type]
        self._pings.add(ping)
        ping.add_done_callback(self._pings.discard)
        done, _ = await asyncio.wait({ping}, timeout=max(0.0, timeout))
        if not done:
            return False
        try:
            ping.result()
        except nats.errors.Error as exc:
            if isinstance(exc, nats.errors.FlushTimeoutError | nats.errors.ConnectionClosedError):
                return False
            raise map_nats_error(exc, self.name) from exc
        return True

    def _cancel_pings(self) -> None:
        for ping in list(self._pings):
            ping.cancel()

    async def _bounded(self, awaitable: Awaitable[Any], timeout: float) -> bool:
        """Await *awaitable* for at most *timeout* s; cancel it (without waiting) if late.

        nats-py swallows cancellation in places, so ``asyncio.wait_for`` could hang.
        """
        task = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({task}, timeout=max(0.0, timeout))
        if not done:
            task.cancel()
            return False
        task.result()
        return True

    async def close(self) -> None:
        """Drain (bounded by ``drain_timeout``) and close. Safe to call many times, also
        concurrently; it ends closed even when the drain fails or the server is stalled."""
        if self._closed:
            return
        if self._close_task is None:
            self._closing = True
            self.ready = False
            self._close_task = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        nc = self.nc
        try:
            if nc is not None and not nc.is_closed:
                await self._drain(nc, deadline)
        finally:
            if self._poll_handle is not None:
                self._poll_handle.cancel()
            self._cancel_pings()
            self._closed = True
            left = self._outbox.take()
            if left:
                self._count("dropped", len(left))
                self.logger.error("cluster %s: closed with %d messages never sent", self.name, len(left))
            self.logger.info("cluster %s: closed (%s)", self.name, self.stats())

    async def _drain(self, nc: Client, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        # Closing a reconnecting client throws its buffer away: give it the time to return.
        # nats-py offers no event for this state change, hence the polling.
        while (nc.is_reconnecting or nc.is_connecting) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        await self._pump_all(nc, deadline)  # move what is still queued here into the client
        drained = False
        if nc.is_connected:
            if self._fast:
                _natsio.write_pending_now(nc)
            try:
                drained = await self._bounded(nc.drain(), deadline - loop.time())
            except Exception as exc:
                self.logger.warning("cluster %s: drain failed: %s", self.name, redact(str(exc) or type(exc).__name__))
        if not drained:
            unsent = _natsio.buffered_bytes(nc)
            if not await self._bounded(self._quiet(nc.close()), max(0.5, deadline - loop.time())):
                _natsio.abort_transport(nc)
            if unsent:
                self._count("dropped_bytes", unsent)
                self.logger.error("cluster %s: close could not deliver %d buffered bytes", self.name, unsent)
        self._in_flight = 0

    async def _quiet(self, coro: Coroutine[Any, Any, None]) -> None:
        with contextlib.suppress(Exception):
            await coro
