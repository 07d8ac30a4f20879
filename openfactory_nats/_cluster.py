"""The asyncio core: one nats-py connection to one NATS cluster."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

from nats.aio.client import Client

from . import _natsio
from ._aio import bounded, quiet
from ._callbacks import callbacks_for, describe
from ._errors import (
    BufferFullError,
    ClusterClosedError,
    ClusterTimeoutError,
    ClusterUnavailableError,
    ConnectError,
    ConnectTimeoutError,
    InvalidMessageError,
    InvalidTypeError,
    WrongThreadError,
)
from ._jetstream import PubAck, check_msg_id, new_msg_id, publish_acked
from ._pump import Pump
from ._redact import redact_url
from ._state import ClusterState
from ._stats import Stats
from ._wire import build_frame, check_timeout, payload_bytes

__all__ = ("DEFAULT_MAX_PENDING_BYTES", "NatsCluster")

DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024
DEFAULT_ACK_TIMEOUT = 10.0
_DEFAULT_MAX_PAYLOAD = 1024 * 1024
_UNKNOWN_MAX_PAYLOAD = 64 * 1024 * 1024  # before the first connection: the protocol's limit
_CALLBACKS = ("error_cb", "disconnected_cb", "reconnected_cb", "closed_cb", "discovered_server_cb", "lame_duck_mode_cb")
_RESERVED = ("servers", "allow_reconnect", "max_reconnect_attempts", "pending_size")

Item = Any  # a frame (fast path) or a (subject, payload, headers, size) tuple (public-API path)


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
    :param replay_unconfirmed: after a lost connection, send again the messages the server
        had not confirmed (at-least-once; a message can then arrive twice). With False,
        they are lost with the connection (at-most-once).
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
        replay_unconfirmed: bool = True,
        **options: Any,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidTypeError("name must be a non-empty str", cluster=None)
        urls = [servers] if isinstance(servers, str) else list(servers)
        if not urls or not all(isinstance(u, str) and u.strip() for u in urls):
            raise InvalidMessageError(f"cluster {name!r}: servers must be non-empty URL strings", cluster=name)
        if (
            isinstance(max_pending_bytes, bool)
            or not isinstance(max_pending_bytes, int)
            or max_pending_bytes < 64 * 1024
        ):
            raise InvalidMessageError(f"cluster {name!r}: max_pending_bytes must be an int >= 65536", cluster=name)
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
        self._stats = Stats()
        self._pump = Pump(name, logger, max_pending_bytes, self._stats, fast=self._fast, replay=replay_unconfirmed)
        self._max_payload = _DEFAULT_MAX_PAYLOAD
        self._js: Any = None
        self._close_task: asyncio.Task[None] | None = None
        self._connecting = False
        self._closing = False
        self._closed = False
        self._ever_connected = False
        self._last_error: BaseException | None = None
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
        ``acked`` confirmed publishes; ``errors`` reported by the client; ``reconnects``;
        ``disconnects``; ``replayed`` messages sent again after a lost connection;
        ``dropped`` messages and ``dropped_bytes`` that could not be delivered (each loss
        is also logged at ERROR); ``refused`` messages (buffer full); and two gauges:
        ``queued`` messages not yet handed to the client and ``unsent_bytes`` handed to it
        but not yet written to the socket (with replay: not yet confirmed).
        """
        result = self._stats.snapshot()
        result["queued"] = len(self._pump.outbox)
        result["unsent_bytes"] = self._pump.in_flight
        return result

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise ClusterClosedError(f"cluster {self.name!r} is closed", cluster=self.name)

    def _client_usable(self) -> bool:
        return self._pump.usable(self.nc)

    def _adopt_loop(self) -> None:
        """Bind to the running loop; after the previous loop ended (``asyncio.run`` per
        call, as in the original's documentation), start afresh on this one and keep
        what the old client never sent."""
        loop = asyncio.get_running_loop()
        previous = self._pump.loop
        if previous is loop:
            return
        if previous is not None and not previous.is_closed():
            raise WrongThreadError(f"cluster {self.name!r} is bound to another running event loop", cluster=self.name)
        if previous is not None:
            self._pump.salvage()
            self.nc, self._js, self.ready = None, None, False
            self._lock = asyncio.Lock()
            self._close_task = None
        self._pump.bind(loop)

    # -- connecting ----------------------------------------------------------------
    async def connect(self) -> None:
        """Connect, unless a client exists that is connected or reconnecting.

        One attempt runs at a time; the whole call, waiting for another caller's attempt
        included, is bounded by ``connect_timeout``.

        :raises ConnectTimeoutError: when no server answered within ``connect_timeout``.
        :raises ConnectError: when the connection was refused (credentials, certificate).
        :raises ClusterClosedError: after :meth:`close`.
        """
        self._check_open()
        self._adopt_loop()
        await self._connect()

    async def _connect(self) -> None:
        if self._client_usable():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        try:
            await asyncio.wait_for(self._lock.acquire(), self.connect_timeout)
        except TimeoutError:
            raise self.connect_timeout_error() from None
        try:
            if not self._client_usable() and not self._closed:
                self._connecting = True
                await self._open_client(deadline)
        finally:
            self._connecting = False
            self._lock.release()
        self._pump.on_wake()

    def connect_timeout_error(self, timeout: float | None = None) -> ConnectTimeoutError:
        """The error for a connection not made within *timeout* s (``connect_timeout``)."""
        servers = ", ".join(redact_url(u) for u in self.servers)
        seconds = self.connect_timeout if timeout is None else timeout
        last = f"; last error: {describe(self._last_error)}" if self._last_error is not None else ""
        return ConnectTimeoutError(
            f"cluster {self.name!r}: could not connect to [{servers}] within {seconds:g} s{last}", cluster=self.name
        )

    async def _open_client(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        nc = Client()
        refused: asyncio.Future[BaseException] = loop.create_future()
        self._last_error = None
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
                **callbacks_for(self, nc, refused),
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
                    f"cluster {self.name!r}: connection refused: {describe(refused.result())}", cluster=self.name
                ) from refused.result()
            raise self.connect_timeout_error()
        exc = task.exception()
        if exc is not None:
            self._abandon(nc, task)
            raise ConnectError(f"cluster {self.name!r}: could not connect: {describe(exc)}", cluster=self.name) from exc
        self.nc = nc
        self._js = None
        self._max_payload = nc.max_payload or _DEFAULT_MAX_PAYLOAD
        self._ever_connected = True
        self._pump.attach(nc)
        self.ready = True
        self.logger.info("cluster %s: connected to %s", self.name, self._server_of(nc))

    @staticmethod
    def _abandon(nc: Client, task: asyncio.Task[None]) -> None:
        task.cancel()
        _natsio.abort_transport(nc)

    def _server_of(self, nc: Client) -> str:
        url = nc.connected_url
        return redact_url(url.geturl()) if url is not None else "?"

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
            self._pump.outbox.reserve(size, timeout)
        except BufferFullError:
            self._stats.add("refused")
            raise

    def enqueue(self, item: Item, size: int, timeout: float) -> None:
        """Queue a prepared message from any thread, waiting up to *timeout* for room.

        :raises BufferFullError: when the outgoing buffer stayed full for *timeout* s.
        """
        try:
            self._pump.outbox.put(item, size, timeout)
        except BufferFullError:
            self._stats.add("refused")
            raise

    @overload
    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        ack: Literal[False] = False,
        msg_id: str | None = None,
    ) -> None: ...

    @overload
    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        ack: Literal[True],
        msg_id: str | None = None,
    ) -> PubAck: ...

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        ack: bool = False,
        msg_id: str | None = None,
    ) -> PubAck | None:
        """Validate and queue one message for the server.

        When this returns the message is queued in the client, as with nats-py's own
        ``publish``; while reconnecting it waits, in order, for the reconnection.

        With ``ack=True`` the message goes into the JetStream stream bound to *subject*
        and the stream's acknowledgement is returned. It carries *msg_id* (one is
        generated when None) as ``Nats-Msg-Id``, and is retried with it until *timeout*
        (default 10 s), so the stream stores it once.

        :param timeout: without ``ack``, how long to wait for room in a full buffer
            (default 0: refuse at once).
        :raises InvalidTypeError: for a non-str subject or a payload that is not bytes-like.
        :raises InvalidMessageError: for an invalid subject, headers or msg_id, or a
            payload over the server's ``max_payload``.
        :raises ConnectError: when the cluster cannot be reached (lazy connect).
        :raises BufferFullError: when the outgoing buffer stays full for *timeout* s.
        :raises ClusterTimeoutError: with ``ack``, when no acknowledgement came in time.
        :raises ClusterClosedError: after :meth:`close`.
        """
        self._check_open()
        wait = check_timeout(timeout) if timeout is not None else (DEFAULT_ACK_TIMEOUT if ack else 0.0)
        limit = self._max_payload if self._ever_connected else _UNKNOWN_MAX_PAYLOAD
        item, size = self.prepare(subject, payload, headers, limit)
        if ack:
            return await self._publish_acked(subject, payload, headers, msg_id, wait)
        self._adopt_loop()
        if not self._client_usable():
            await self._connect()
            item, size = self.prepare(subject, payload, headers, self._max_payload)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            try:
                self._pump.outbox.put(item, size, 0.0)
                break
            except BufferFullError:
                if loop.time() >= deadline:
                    self._stats.add("refused")
                    raise
                self._pump.on_wake()
                await asyncio.sleep(0.002)
        self._pump.on_wake()
        return None

    async def _publish_acked(
        self, subject: str, payload: bytes, headers: Mapping[str, str] | None, msg_id: str | None, wait: float
    ) -> PubAck:
        ident = new_msg_id() if msg_id is None else check_msg_id(msg_id)
        self._adopt_loop()
        if not self._client_usable():
            await self._connect()
        if len(payload) > self._max_payload:
            raise InvalidMessageError(f"payload exceeds the server's max_payload of {self._max_payload}")
        if self.nc is not None:  # what was queued before goes first (while connected)
            await self._pump.pump_all(self.nc, asyncio.get_running_loop().time() + wait)

        def jetstream() -> Any:
            nc = self.nc
            if nc is None or not self._client_usable():
                return None
            if self._js is None:
                self._js = nc.jetstream()
            return self._js

        ack = await publish_acked(self.name, jetstream, subject, payload_bytes(payload), headers, ident, wait)
        self._stats.add("acked")
        return ack

    # -- flushing and closing ------------------------------------------------------
    async def flush(self, timeout: float = 10.0) -> None:
        """Write everything queued so far and wait for the server to confirm (PING/PONG).

        While reconnecting it waits for the reconnection, since a PONG from before the
        outage proves nothing about buffered messages.

        :raises ClusterTimeoutError: when that did not happen within *timeout* seconds.
        :raises ClusterClosedError: after :meth:`close`.
        """
        self._check_open()
        wait = check_timeout(timeout)
        self._adopt_loop()
        await self._flush(wait)

    async def _flush(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not self._client_usable():
            if not self._pump.pending_work() and self.nc is None:
                return
            await self._connect()
        while True:
            nc = self.nc
            if nc is None or not self._client_usable():
                raise ClusterUnavailableError(f"cluster {self.name!r}: connection lost during flush", cluster=self.name)
            await self._pump.pump_all(nc, deadline)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ClusterTimeoutError(
                    f"cluster {self.name!r}: flush did not complete within {timeout:g} s", cluster=self.name
                )
            if nc.is_connected:
                reconnects = self._stats.get("reconnects")
                if self._fast:
                    _natsio.write_pending_now(nc)
                rounds = 1 if self._fast else 2  # a first PING may overtake what is pending
                answered = True
                for _ in range(rounds):
                    answered = await self._pump.ping(nc, deadline - loop.time())
                    if not answered:
                        break
                if answered and reconnects == self._stats.get("reconnects") and nc.is_connected:
                    self._pump.reconcile(nc)
                    return
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Drain (bounded by ``drain_timeout``) and close. Safe to call many times, also
        concurrently; it ends closed even when the drain fails or the server is stalled."""
        if self._closed:
            return
        if self._close_task is None:
            self._adopt_loop()
            self._closing = True
            self.ready = False
            self._close_task = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        try:
            if self.nc is None and self._pump.pending_work():
                # Messages are still waiting (for instance from an event loop that ended):
                # try to deliver them within the drain time.
                try:
                    await asyncio.wait_for(self._open_client(deadline), max(0.0, deadline - loop.time()))
                except (ConnectError, TimeoutError) as exc:
                    self.logger.error("cluster %s: could not connect to deliver at close: %s", self.name, exc)
            nc = self.nc
            if nc is not None and not nc.is_closed:
                await self._drain(nc, deadline)
        finally:
            self._closed = True
            left = self._pump.shutdown()
            if left:
                self._stats.add("dropped", len(left))
                self.logger.error("cluster %s: closed with %d messages never sent", self.name, len(left))
            self.logger.info("cluster %s: closed (%s)", self.name, self.stats())

    async def _drain(self, nc: Client, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        # Closing a reconnecting client throws its buffer away: give it the time to return.
        # nats-py offers no event for this state change, hence the polling.
        while (nc.is_reconnecting or nc.is_connecting) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        await self._pump.pump_all(nc, deadline)  # move what is still queued here into the client
        drained = False
        if nc.is_connected:
            if self._fast:
                _natsio.write_pending_now(nc)
            try:
                drained = await bounded(nc.drain(), deadline - loop.time())
            except Exception as exc:
                self.logger.warning("cluster %s: drain failed: %s", self.name, describe(exc))
        if not drained:
            unsent = _natsio.buffered_bytes(nc)
            if not await bounded(quiet(nc.close()), max(0.5, deadline - loop.time())):
                _natsio.abort_transport(nc)
            if unsent:
                self._stats.add("dropped_bytes", unsent)
                self.logger.error("cluster %s: close could not deliver %d buffered bytes", self.name, unsent)
