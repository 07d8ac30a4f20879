"""The asyncio core: one nats-py connection to one NATS cluster.

Its life cycle (phases, who moves them, on which thread) is described and kept in
:mod:`.lifecycle`; this module asks it and never keeps a state flag of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

import nats.errors
from nats.aio.client import Client

from .._aio import bounded, quiet
from .._errors import (
    BufferFullError,
    ClusterClosedError,
    ClusterTimeoutError,
    ClusterUnavailableError,
    ConnectTimeoutError,
    InvalidMessageError,
    InvalidTypeError,
    WrongThreadError,
)
from .._jetstream.aio import AsyncJetStream
from .._message import Msg
from .._natsio import internals
from .._natsio.client import CALLBACKS, describe, open_client
from .._receive.inbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_MSGS
from .._receive.subscription import AsyncCallback, AsyncSubscription
from .._redact import redact_url
from .._send.acked import MSG_ID_HEADER, PubAck, check_msg_id, new_msg_id, publish_acked
from .._send.pump import Pump
from .._stats import Stats
from .._wire import (
    SPLIT_PAYLOAD,
    WireSubject,
    build_frame,
    check_timeout,
    frame_size,
    payload_bytes,
    split_frame,
)
from . import registry
from .incoming import Incoming
from .lifecycle import ClusterState, Lifecycle, Phase

__all__ = ("DEFAULT_MAX_PENDING_BYTES", "NatsCluster")

DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024
DEFAULT_ACK_TIMEOUT = 10.0
_DEFAULT_MAX_PAYLOAD = 1024 * 1024
_UNKNOWN_MAX_PAYLOAD = 64 * 1024 * 1024  # before the first connection: the protocol's limit
_RESERVED = ("servers", "allow_reconnect", "max_reconnect_attempts", "pending_size")
_LARGE = 64 * 1024  # payloads above this reserve their room before their frame is built
_POLL = 0.01
_OPEN = Phase.OPEN
_warned_public_api = False

Item = Any  # a frame (fast path) or a (subject, payload, headers, size, reply) tuple (public-API path)


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
        self._user_callbacks = {key: options.pop(key) for key in CALLBACKS if key in options}
        self._options = options
        websocket = any(url.startswith(("ws://", "wss://")) for url in self.servers)
        self._fast = internals.supports_fast_path() and not websocket
        if websocket:
            # nats-py's websocket transport sends only from its own flusher.
            logger.info("cluster %s: websocket servers: publishing through nats-py's public API", name)
        elif not self._fast:
            _warn_public_api(logger)
        self._stats = Stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump = Pump(
            name,
            logger,
            max_pending_bytes,
            self._stats,
            client=self._attached,
            wake=self._wake,
            fast=self._fast,
            replay=replay_unconfirmed,
            still_wanted=lambda frame: self.incoming.still_wanted(frame),
        )
        self._life = Lifecycle(name, logger, on_close=self._refuse_new)
        self._revive: asyncio.Task[None] | None = None
        self._max_payload = _DEFAULT_MAX_PAYLOAD
        #: The receive side: subscriptions and requests (see :mod:`.incoming`).
        self.incoming = Incoming(
            name,
            logger,
            self._life,
            self._pump,
            self._stats,
            fast=self._fast,
            connect_timeout=self.connect_timeout,
            connect=self._connect,
            attached=self._attached,
            adopt_loop=self._adopt_loop,
            on_loop=self._on_loop,
            lost_error=self._lost_error,
            offer=self.offer,
            prepare=self.prepare,
            max_payload=lambda: self._max_payload,
        )
        self._receivers = self.incoming.receivers
        self._js: Any = None
        self._close_task: asyncio.Task[None] | None = None
        self._last_error: BaseException | None = None
        registry.track(self)  # weakly, for openfactory_nats.prometheus

    def __repr__(self) -> str:
        servers = ", ".join(redact_url(u) for u in self.servers)
        return f"<NatsCluster {self.name!r} [{servers}] {self.state.value}>"

    # -- state ---------------------------------------------------------------------
    @property
    def state(self) -> ClusterState:
        """The current :class:`ClusterState`."""
        nc = self.nc
        if nc is None:
            return self._life.state(False, False)
        return self._life.state(nc.is_connected, nc.is_reconnecting or nc.is_connecting)

    @property
    def is_connected(self) -> bool:
        """True while connected to a server and open."""
        return self.state is ClusterState.CONNECTED

    def check_open(self) -> None:
        """Any thread.

        :raises ClusterClosedError: once closing has started.
        """
        self._life.check_open()

    @property
    def max_payload(self) -> int:
        """The server's ``max_payload`` (1 MiB until the first connection)."""
        return self._max_payload

    def jetstream(self) -> AsyncJetStream:
        """A JetStream handle bound to this cluster: the blocking
        :meth:`SyncNatsCluster.jetstream`'s calls, as coroutines."""
        self._life.check_open()
        return AsyncJetStream(self)

    def count(self, key: str, amount: int = 1) -> None:
        """Add *amount* to the counter *key* of :meth:`stats` (any thread)."""
        self._stats.add(key, amount)

    def counter(self, key: str) -> int:
        """One counter of :meth:`stats` (any thread), e.g. ``reconnects``."""
        return self._stats.get(key)

    def offer_pull(self, subject: str, reply: str, payload: bytes, timeout: float) -> bool:
        """Queue a JetStream pull request (any thread); False when no client is open yet."""
        return self.incoming.offer_request(subject, reply.encode(), payload, None, timeout, counted=False)

    def stats(self) -> dict[str, int]:
        """Counters since construction.

        ``published`` messages and their ``bytes`` (protocol frames) handed to the client;
        ``acked`` confirmed publishes; ``errors`` reported by the client; ``reconnects``;
        ``disconnects``; ``replayed`` messages sent again after a lost connection;
        ``dropped`` messages and ``dropped_bytes`` that could not be delivered or whose
        delivery close could not confirm (each loss is also logged at ERROR); ``refused``
        messages (buffer full); ``received`` messages handed to subscriptions,
        ``receive_dropped`` messages subscriptions dropped because they were full (a slow
        consumer; reported at WARNING), ``receive_malformed`` messages dropped because
        they could not be read (a subject, reply subject or status line that is not UTF-8,
        a broken header block; reported at WARNING), ``callback_errors`` raised by
        subscription callbacks (logged at ERROR) and ``discarded`` messages received but
        thrown away because their subscription ended first (still pending at
        ``unsubscribe()``, or when a drain, ``close()``'s included, ran out of time; logged
        once per subscription); and the gauges ``queued`` messages not yet handed to
        the client, ``unsent_bytes`` handed to it but not yet written to the socket (with
        replay: not yet confirmed) and ``subscriptions``; ``requests`` sent and
        ``late_replies`` that came after their requester had given up (dropped);
        JetStream worker pools' ``js_processed`` and ``js_failed`` messages (handler
        returned, raised) and ``js_ack_errors``, acknowledgements that could not be sent
        (the server redelivers those messages).
        """
        result = self._stats.snapshot()
        result["queued"] = len(self._pump.outbox)
        result["unsent_bytes"] = self._pump.in_flight
        received, dropped, errors, discarded = self._receivers.counts()
        result["received"] = received
        result["receive_dropped"] = dropped
        result["receive_malformed"] = self._receivers.malformed
        result["callback_errors"] = errors
        result["discarded"] = discarded
        result["subscriptions"] = len(self._receivers)
        result["late_replies"] = self.incoming.late_replies
        return result

    def _refuse_new(self) -> None:
        """Closing has begun (any thread): refuse new messages, and end the requests
        waiting for a reply at once."""
        self._pump.outbox.shut()
        self.incoming.fail_requests(
            ClusterClosedError(f"cluster {self.name!r} is closed", cluster=self.name), for_good=True
        )

    def _attached(self) -> Client | None:
        """The client messages go to: the open one, or the one being drained."""
        phase = self._life.phase
        return self.nc if phase is Phase.OPEN or phase is Phase.CLOSING else None

    def _on_loop(self) -> bool:
        """True on the event-loop thread this core runs on."""
        return self._loop is not None and asyncio._get_running_loop() is self._loop

    def _wake(self) -> None:
        """Ask the loop to move queued messages into the client (any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._pump.on_wake)
        except RuntimeError:
            pass  # the loop is closing; close() or the next loop takes over the outbox

    def _adopt_loop(self) -> None:
        """Bind to the running loop; after the previous loop ended (``asyncio.run`` per
        call, as in the original's documentation), start afresh on this one and keep
        what the old client never sent."""
        loop = asyncio.get_running_loop()
        previous = self._loop
        if previous is loop:
            return
        if previous is not None and not previous.is_closed():
            raise WrongThreadError(f"cluster {self.name!r} is bound to another running event loop", cluster=self.name)
        if previous is not None:
            nc, self.nc, self._js = self.nc, None, None
            self._life.loop_ended()
            self._pump.salvage(nc)
            self._lock = asyncio.Lock()
            self._close_task = None
        self._loop = loop

    # -- connecting ----------------------------------------------------------------
    async def connect(self) -> None:
        """Connect, unless a client exists that is connected or reconnecting.

        One attempt runs at a time; the whole call, waiting for another caller's attempt
        included, is bounded by ``connect_timeout``.

        :raises ConnectTimeoutError: when no server answered within ``connect_timeout``.
        :raises ConnectError: when the connection was refused (credentials, certificate).
        :raises ClusterClosedError: after :meth:`close`.
        """
        self._life.check_open()
        self._adopt_loop()
        await self._connect(self.connect_timeout)

    async def _connect(self, timeout: float) -> None:
        if self._life.accepting:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await asyncio.wait_for(self._lock.acquire(), timeout)
        except TimeoutError:
            raise self.connect_timeout_error(timeout) from None
        try:
            fallback = self._life.begin_connect()
            if fallback is None:
                return
            try:
                nc = await open_client(self, self._connect_options(), deadline)
            except BaseException:
                self._life.connect_failed(fallback)
                raise
            if self._life.closing:  # close() began while connecting, and may be over: leave no client
                internals.abort_transport(nc)
                await quiet(nc.close())
                self._life.check_open()  # raises ClusterClosedError
            self.nc = nc
            self._js = None
            self._max_payload = nc.max_payload or _DEFAULT_MAX_PAYLOAD
            self._pump.attach(nc)
            self._life.connected()  # raises ClusterClosedError if close() began meanwhile
            self.logger.info("cluster %s: connected to %s", self.name, self._server_of(nc))
            if self._receivers.any():
                await self._receivers.attach_all(nc)
        finally:
            self._lock.release()
        self._pump.on_wake()

    def _connect_options(self) -> dict[str, Any]:
        self._last_error = None
        return {
            "name": self.name,
            "ping_interval": 10,
            "flush_timeout": self.connect_timeout,
            **self._options,
            "servers": self.servers,
            "reconnect_time_wait": self.reconnect_time_wait,
            "connect_timeout": self.connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "pending_size": self.max_pending_bytes,
        }

    def connect_timeout_error(self, timeout: float | None = None) -> ConnectTimeoutError:
        """The error for a connection not made within *timeout* s (``connect_timeout``)."""
        servers = ", ".join(redact_url(u) for u in self.servers)
        seconds = self.connect_timeout if timeout is None else timeout
        last = f"; last error: {describe(self._last_error)}" if self._last_error is not None else ""
        return ConnectTimeoutError(
            f"cluster {self.name!r}: could not connect to [{servers}] within {seconds:g} s{last}", cluster=self.name
        )

    def _server_of(self, nc: Client) -> str:
        url = nc.connected_url
        return redact_url(url.geturl()) if url is not None else "?"

    # -- events of the nats-py client (see _natsio.client) -----------------------------
    def _client_error(self, nc: Client, exc: BaseException) -> None:
        self._stats.add("errors")
        self._last_error = exc
        self._receivers.refused(nc, exc)
        self.logger.warning("cluster %s: error: %s", self.name, describe(exc))
        if nc is self._attached() and self._fast:
            self._pump.watch_close(nc)  # the connection may be going: see that nats-py can move on

    def _client_disconnected(self, nc: Client) -> None:
        if nc is self.nc and self._life.accepting:  # not when our own close() ends it
            self._stats.add("disconnects")
            self.logger.warning("cluster %s: disconnected; buffering until reconnected", self.name)
            self._pump.on_disconnected(nc)

    def _client_reconnected(self, nc: Client) -> None:
        self._stats.add("reconnects")
        self._max_payload = nc.max_payload or self._max_payload
        self.logger.info("cluster %s: reconnected to %s", self.name, self._server_of(nc))
        if nc is self._attached():
            self._pump.on_reconnected(nc)

    def _client_closed(self, nc: Client) -> None:
        if nc is self.nc and self._life.lost():
            self._pump.lose_in_flight("nats-py closed the connection for good")
            self.incoming.fail_requests(self._lost_error("request"), for_good=False)  # gone with the connection
            if len(self._receivers):  # subscribers make no next call: come back by ourselves
                self.logger.error("cluster %s: connection closed by the client; reconnecting", self.name)
                self._revive = asyncio.get_running_loop().create_task(self._reconnect_receivers())
            else:
                self.logger.error("cluster %s: connection closed by the client; will reconnect on next use", self.name)

    async def _reconnect_receivers(self) -> None:
        """Connect again (backing off) while subscriptions wait for a client."""
        while not self._life.closing and not self._life.accepting and len(self._receivers):
            await asyncio.sleep(max(0.05, self.reconnect_time_wait))
            try:
                await self._connect(self.connect_timeout)  # subscribes them all again
            except (ClusterUnavailableError, TimeoutError) as exc:
                self.logger.warning("cluster %s: reconnecting for the subscriptions failed: %s", self.name, exc)

    def _client_discovered(self, nc: Client) -> None:
        found = [redact_url(s.geturl()) for s in nc.discovered_servers]
        self.logger.info("cluster %s: discovered servers %s", self.name, found)

    def _client_malformed(self, subject: bytes, exc: Exception) -> None:
        self._receivers.on_malformed(subject, exc)

    def _client_lame_duck(self, nc: Client) -> None:
        self.logger.warning(
            "cluster %s: server %s entered lame-duck mode; moving to another server", self.name, self._server_of(nc)
        )
        if nc is self.nc and self._life.accepting:
            # Leave before the server closes the connection, so that nothing is cut off.
            asyncio.get_running_loop().create_task(nc.force_reconnect())

    # -- publishing ----------------------------------------------------------------
    def prepare(self, subject: object, payload: object, headers: object, max_payload: int | None = None) -> int:
        """Validate a message (any thread) and return its frame's size in bytes.

        :param max_payload: the limit to check against (default: the server's, or the
            protocol's before the first connection).
        """
        if max_payload is None:
            max_payload = self._max_payload if self._life.ever_open else _UNKNOWN_MAX_PAYLOAD
        return frame_size(subject, payload, headers, max_payload)

    def offer(self, subject: object, payload: object, headers: object, timeout: float) -> bool:
        """Validate a message and queue it, from any thread, waiting up to *timeout* s
        for room. Returns False, with nothing queued, when no client is open yet (the
        caller connects, then offers again).

        :raises BufferFullError: when the outgoing buffer stayed full for *timeout* s.
        :raises ClusterClosedError: once closing has started.
        """
        if self._life.phase is not _OPEN:
            self._life.check_open()
            return False
        outbox = self._pump.outbox
        try:
            if self._fast:
                if type(payload) is not bytes:
                    payload = payload_bytes(payload)  # copied once, here; TypeError if not bytes-like
                size = len(payload)
                if size < SPLIT_PAYLOAD:
                    frame = build_frame(subject, payload, headers, self._max_payload)
                    outbox.put(frame, len(frame), timeout)
                    return True
                if size > _LARGE:
                    # Make room before building a large frame, so that nothing waits
                    # outside the budget: the cap is on memory.
                    outbox.reserve(frame_size(subject, payload, headers, self._max_payload), timeout)
                # Not copied: the frame references the (immutable) payload.
                large = split_frame(subject, payload, headers, self._max_payload)
                outbox.put(large, large.size, timeout)
            else:
                frame = build_frame(subject, payload, headers, self._max_payload)  # validation only
                copied = dict(headers) if isinstance(headers, Mapping) else None
                name = subject.decode() if isinstance(subject, WireSubject) else subject
                outbox.put((name, payload_bytes(payload), copied, len(frame), ""), len(frame), timeout)
        except BufferFullError:
            self._stats.add("refused")
            raise
        return True

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
        self._life.check_open()
        wait = check_timeout(timeout) if timeout is not None else (DEFAULT_ACK_TIMEOUT if ack else 0.0)
        if ack:
            self.prepare(subject, payload, headers)
            return await self._publish_acked(subject, payload, headers, msg_id, wait)
        self._adopt_loop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        size = self.prepare(subject, payload, headers)
        while True:
            if not self._life.accepting:
                await self._connect(self.connect_timeout)
            elif loop.time() >= deadline or self._pump.outbox.try_reserve(size):
                if self.offer(subject, payload, headers, 0.0):  # refused (and counted) when still full
                    return None
            else:
                self._pump.on_wake()
                await asyncio.sleep(0.002)

    async def _publish_acked(
        self, subject: str, payload: bytes, headers: Mapping[str, str] | None, msg_id: str | None, wait: float
    ) -> PubAck:
        ident = new_msg_id() if msg_id is None else check_msg_id(msg_id)
        self._adopt_loop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        if not self._life.accepting:
            await self._connect(min(self.connect_timeout, wait))
        # The server counts the headers, ours included, against max_payload.
        build_frame(subject, payload, {**(headers or {}), MSG_ID_HEADER: ident}, self._max_payload)
        # What was queued before goes first, also during an outage: JetStream's request
        # would otherwise wait in nats-py's reconnect buffer, ahead of our outbox.
        await self._pump_before(self._pump.outbox.mark(), deadline, "acknowledged publish")

        def jetstream() -> Any:
            nc = self._attached()
            if nc is None or not self._life.accepting:
                return None
            if self._js is None:
                self._js = nc.jetstream()
            return self._js

        ack = await publish_acked(
            self.name, jetstream, subject, payload_bytes(payload), headers, ident, max(0.0, deadline - loop.time())
        )
        self._stats.add("acked")
        return ack

    async def _pump_before(self, mark: int, deadline: float, what: str) -> None:
        """Hand the client everything queued before *mark*, waiting for a reconnection
        if need be, by *deadline*."""
        loop = asyncio.get_running_loop()
        while not await self._pump.pump_to(mark, deadline):
            self._life.check_open()
            if self._attached() is None:
                raise self._lost_error(what)
            if loop.time() >= deadline:
                raise ClusterTimeoutError(
                    f"cluster {self.name!r}: {what}: the messages queued before it could not be sent in time",
                    cluster=self.name,
                )
            await asyncio.sleep(_POLL)

    def _lost_error(self, what: str) -> ClusterUnavailableError:
        return ClusterUnavailableError(f"cluster {self.name!r}: connection lost during {what}", cluster=self.name)

    # -- flushing and closing ------------------------------------------------------
    async def flush(self, timeout: float = 10.0) -> None:
        """Send everything queued before this call and wait for the server to confirm it
        (PING/PONG). Messages queued meanwhile by other tasks or threads are not waited for.

        While reconnecting it waits for the reconnection, since a PONG from before the
        outage proves nothing about buffered messages.

        :raises ClusterTimeoutError: when that did not happen within *timeout* seconds.
        :raises ClusterUnavailableError: when the client gave up reconnecting meanwhile.
        :raises ClusterClosedError: after :meth:`close` (also when it starts meanwhile).
        """
        self._life.check_open()
        wait = check_timeout(timeout)
        self._adopt_loop()
        await self._flush(wait)

    async def _flush(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not self._life.accepting:
            if not self._pump.pending_work() and self.nc is None:
                return
            await self._connect(min(self.connect_timeout, timeout))
        mark = self._pump.outbox.mark()
        rounds = 1 if self._fast else 2  # nats-py's own PING may overtake what it holds
        while True:
            self._life.check_open()
            nc = self._attached()
            if nc is None:
                raise self._lost_error("flush")
            if loop.time() >= deadline:
                raise ClusterTimeoutError(
                    f"cluster {self.name!r}: flush did not complete within {timeout:g} s", cluster=self.name
                )
            if nc.is_connected and await self._pump.pump_to(mark, deadline):
                answered: bool | None = True
                for _ in range(rounds):
                    answered = await self._pump.ping(nc, deadline - loop.time())
                    if not answered:
                        break
                if answered:
                    self._pump.reconcile(nc)
                    return
                continue  # timed out (the loop raises) or lost: try again once reconnected
            await asyncio.sleep(_POLL)

    # -- receiving (the work is done by self.incoming) ------------------------------
    async def subscribe(
        self,
        subject: str,
        callback: AsyncCallback | None = None,
        *,
        queue: str | None = None,
        max_pending_msgs: int = DEFAULT_MAX_MSGS,
        max_pending_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float = 10.0,
    ) -> AsyncSubscription:
        """Subscribe to *subject* (wildcards allowed: ``*`` a token, ``>`` the rest).

        With an ``async`` *callback*, it is awaited for each message, in order; without
        one, read with ``await sub.next_msg(timeout)`` or ``async for msg in sub``. Beyond
        the limits, messages are dropped, counted (``sub.dropped``) and reported. Returns
        once the server has registered the interest.

        :raises InvalidMessageError: for an invalid subject filter or queue group, or
            both together too long for the server's control line.
        :raises InvalidTypeError: for arguments of the wrong type.
        :raises ConnectError: when the cluster cannot be reached.
        :raises RefusedError: when the server refused the subscription (permissions,
            limits).
        :raises ClusterUnavailableError: when the connection was lost while subscribing.
        :raises ClusterClosedError: after :meth:`close`.
        """
        return await self.incoming.subscribe(
            subject,
            callback,
            queue=queue,
            max_pending_msgs=max_pending_msgs,
            max_pending_bytes=max_pending_bytes,
            timeout=timeout,
        )

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 10.0,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Msg:
        """Send a request and return the reply (see :meth:`SyncNatsCluster.request`).

        :raises NoRespondersError: when nobody listens on *subject*.
        :raises ServiceError: when the service answered with an error.
        :raises ClusterTimeoutError: when no reply came within *timeout* s.
        :raises BufferFullError: when the outgoing buffer is full.
        :raises ClusterClosedError: after :meth:`close` (also when it starts meanwhile).
        """
        return await self.incoming.request(subject, payload, timeout, headers=headers)

    def respond(self, reply: str, data: bytes, headers: Mapping[str, str] | None) -> None:
        """What :meth:`Msg.respond` calls: queue a reply, from any thread; on the event
        loop it never waits (a full buffer raises ``BufferFullError`` at once).

        :raises InvalidMessageError: for a reply subject one cannot publish to (too
            long, an empty token, a wildcard): the server would drop the reply, or close
            the connection.
        :raises ClusterUnavailableError: when no client is open (the reply is not sent).
        """
        self.incoming.respond(reply, data, headers)

    def begin_close(self) -> None:
        """Refuse new messages from now on (any thread); :meth:`close` finishes closing."""
        self._life.begin_close()

    async def close(self, timeout: float | None = None) -> None:
        """Drain and close, within ``drain_timeout`` (or *timeout*, if shorter). Safe to
        call many times, also concurrently; it ends closed even when the drain fails or
        the server is stalled. What could not be delivered in time is counted as dropped
        and logged at ERROR."""
        if self._life.phase is Phase.CLOSED:
            return
        limit = self.drain_timeout if timeout is None else min(self.drain_timeout, check_timeout(timeout))
        self._adopt_loop()
        self._life.begin_close()
        if self._close_task is None:
            deadline = asyncio.get_running_loop().time() + limit
            self._close_task = asyncio.get_running_loop().create_task(self._close(deadline))
        await asyncio.shield(self._close_task)

    async def _close(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        locked = False
        try:
            # A connection attempt in progress ends first (or runs out of time).
            if self._lock.locked():
                locked = await bounded(self._lock.acquire(), deadline - loop.time())
            else:
                locked = await self._lock.acquire()  # free: taken at once, whatever the deadline
            if self.nc is None and self._pump.pending_work():
                # Messages are still waiting (for instance from an event loop that ended):
                # try to deliver them within the drain time.
                try:
                    self.nc = await open_client(self, self._connect_options(), deadline)
                except (ClusterUnavailableError, TimeoutError) as exc:
                    self.logger.error("cluster %s: could not connect to deliver at close: %s", self.name, exc)
                else:
                    self._pump.attach(self.nc)
            if self.nc is not None and not self.nc.is_closed:
                await self._drain(self.nc, deadline)
        finally:
            self._receivers.end_all(lambda receiver: receiver.sink.close(drain=True, timeout=0))
            left = self._pump.shutdown()
            if left:
                self._pump.report_dropped(left, "closed before they could be sent")
            self._life.closed()
            if locked:
                self._lock.release()
            self.logger.info("cluster %s: closed (%s)", self.name, self.stats())

    async def _drain(self, nc: Client, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        # Closing a reconnecting client throws its buffer away: give it the time to return.
        # nats-py offers no event for this state change, hence the polling.
        while (nc.is_reconnecting or nc.is_connecting) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        await self._pump.pump_to(self._pump.outbox.mark(), deadline)
        drained = False
        if nc.is_connected:
            # Our own PING first: its PONG confirms every batch handed over (replay).
            if await self._pump.ping(nc, deadline - loop.time()):
                self._pump.reconcile(nc)
            try:
                drained = await bounded(nc.drain(), deadline - loop.time())
            except (nats.errors.Error, OSError) as exc:
                self.logger.warning("cluster %s: drain failed: %s", self.name, describe(exc))
        if not drained:
            self._pump.unconfirmed_at_close(nc)
            if not await bounded(quiet(nc.close()), max(0.5, deadline - loop.time())):
                internals.abort_transport(nc)


def _warn_public_api(logger: logging.Logger) -> None:
    global _warned_public_api
    if not _warned_public_api:
        _warned_public_api = True
        logger.warning(
            "openfactory-nats: using nats-py's public publish API (slower; no replay of unconfirmed "
            "messages after a lost connection): the installed nats-py lacks the internals of the "
            "batched path, or OPENFACTORY_NATS_PUBLIC_API is set"
        )
