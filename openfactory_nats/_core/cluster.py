"""The asyncio core: one nats-py connection to one NATS cluster.

Its life cycle (phases, who moves them, on which thread) is described and kept in
:mod:`.lifecycle`; this module asks it and never keeps a state flag of its own.
:class:`NatsCluster` is the public API and wires its parts: the nats-py client
(:mod:`.connection`), the send side (:mod:`.outgoing`), the receive side (:mod:`.incoming`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

from nats.aio.client import Client

from .. import _tracing
from .._errors import ClusterClosedError, ClusterUnavailableError, ConnectTimeoutError
from .._jetstream.aio import AsyncJetStream
from .._message import Msg
from .._natsio.client import CALLBACKS
from .._receive.inbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_MSGS
from .._receive.receivers import Receivers
from .._receive.subscription import AsyncCallback, AsyncSubscription
from .._redact import redact_url
from .._send.acked import PubAck
from .._send.pump import Pump
from .._stats import Stats
from .._wire import check_timeout
from . import registry
from .connection import Connection, check_settings
from .incoming import Incoming
from .lifecycle import ClusterState, Lifecycle, Phase
from .outgoing import DEFAULT_ACK_TIMEOUT, Outgoing, uses_fast_path

__all__ = ("DEFAULT_MAX_PENDING_BYTES", "NatsCluster")

DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024


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
        self.servers = check_settings(name, servers, max_pending_bytes, options)
        self.name = name
        self.logger = logger
        self.reconnect_time_wait = check_timeout(reconnect_time_wait, "reconnect_time_wait")
        self.connect_timeout = check_timeout(connect_timeout, "connect_timeout")
        self.drain_timeout = check_timeout(drain_timeout, "drain_timeout")
        self.max_pending_bytes = max_pending_bytes
        user_callbacks = {key: options.pop(key) for key in CALLBACKS if key in options}
        self._fast = uses_fast_path(name, self.servers, logger)
        self._stats = Stats()
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
        self._receivers = Receivers(name, logger, self._fast)
        self._conn = Connection(
            self,
            self._life,
            self._pump,
            self._stats,
            self._receivers,
            options=options,
            user_callbacks=user_callbacks,
            attached=self._attached,
            lost=self._requests_lost,
            fast=self._fast,
        )
        #: The send side: publishing and flushing (see :mod:`.outgoing`).
        self.outgoing = Outgoing(
            self,
            self._life,
            self._pump,
            self._stats,
            self._conn,
            fast=self._fast,
            attached=self._attached,
            adopt_loop=self._conn.adopt_loop,
            lost_error=self._lost_error,
        )
        #: The receive side: subscriptions and requests (see :mod:`.incoming`).
        self.incoming = Incoming(
            name,
            logger,
            self._life,
            self._pump,
            self._stats,
            self._receivers,
            fast=self._fast,
            connect_timeout=self.connect_timeout,
            connect=self._conn.connect,
            attached=self._attached,
            adopt_loop=self._conn.adopt_loop,
            on_loop=self._on_loop,
            lost_error=self._lost_error,
            offer=self.outgoing.offer,
            prepare=self.outgoing.prepare,
            max_payload=lambda: self._conn.max_payload,
        )
        registry.track(self)  # weakly, for openfactory_nats.prometheus

    def __repr__(self) -> str:
        servers = ", ".join(redact_url(u) for u in self.servers)
        return f"<NatsCluster {self.name!r} [{servers}] {self.state.value}>"

    # -- state ---------------------------------------------------------------------
    @property
    def nc(self) -> Client | None:
        """The nats-py client, once made (use it only on the event loop)."""
        return self._conn.nc

    @property
    def state(self) -> ClusterState:
        """The current :class:`ClusterState`."""
        nc = self._conn.nc
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
    def peer(self) -> tuple[str, int] | None:
        """The host and port of the server connected to now, or None (any thread)."""
        return self._conn.peer

    @property
    def max_payload(self) -> int:
        """The server's ``max_payload`` (1 MiB until the first connection)."""
        return self._conn.max_payload

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
        self.incoming.add_counts(result)
        return result

    def _refuse_new(self) -> None:
        """Closing has begun (any thread): refuse new messages, and end the requests
        waiting for a reply at once."""
        self._pump.outbox.shut()
        self.incoming.fail_requests(
            ClusterClosedError(f"cluster {self.name!r} is closed", cluster=self.name), for_good=True
        )

    def _requests_lost(self) -> None:
        """The client is gone for good: end the requests waiting for a reply with it."""
        self.incoming.fail_requests(self._lost_error("request"), for_good=False)

    def _attached(self) -> Client | None:
        """The client messages go to: the open one, or the one being drained."""
        phase = self._life.phase
        return self._conn.nc if phase is Phase.OPEN or phase is Phase.CLOSING else None

    def _on_loop(self) -> bool:
        """True on the event-loop thread this core runs on."""
        loop = self._conn.loop
        return loop is not None and asyncio._get_running_loop() is loop

    def _wake(self) -> None:
        """Ask the loop to move queued messages into the client (any thread)."""
        loop = self._conn.loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._pump.on_wake)
        except RuntimeError:
            pass  # the loop is closing; close() or the next loop takes over the outbox

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
        self._conn.adopt_loop()
        await self._conn.connect(self.connect_timeout)

    def connect_timeout_error(self, timeout: float | None = None) -> ConnectTimeoutError:
        """The error for a connection not made within *timeout* s (``connect_timeout``)."""
        return self._conn.connect_timeout_error(timeout)

    # -- publishing ----------------------------------------------------------------
    def prepare(self, subject: object, payload: object, headers: object, max_payload: int | None = None) -> int:
        """Validate a message (any thread) and return its frame's size in bytes.

        :param max_payload: the limit to check against (default: the server's, or the
            protocol's before the first connection).
        """
        return self.outgoing.prepare(subject, payload, headers, max_payload)

    def offer(self, subject: object, payload: object, headers: object, timeout: float) -> bool:
        """Validate a message and queue it, from any thread, waiting up to *timeout* s
        for room. Returns False, with nothing queued, when no client is open yet (the
        caller connects, then offers again).

        :raises BufferFullError: when the outgoing buffer stayed full for *timeout* s.
        :raises ClusterClosedError: once closing has started.
        """
        return self.outgoing.offer(subject, payload, headers, timeout)

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
        if (hook := _tracing.HOOK) is not None:  # read once: uninstrument() may clear it
            if type(headers) is not _tracing.Traced:
                return await hook.publish_async(self.publish, self, subject, payload, timeout, headers, ack, msg_id)
            headers = headers or None
        self._life.check_open()
        wait = check_timeout(timeout) if timeout is not None else (DEFAULT_ACK_TIMEOUT if ack else 0.0)
        if ack:
            self.outgoing.prepare(subject, payload, headers)
            return await self.outgoing.publish_acked(subject, payload, headers, msg_id, wait)
        self._conn.adopt_loop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        size = self.outgoing.prepare(subject, payload, headers)
        while True:
            if not self._life.accepting:
                await self._conn.connect(self.connect_timeout)
            elif loop.time() >= deadline or self._pump.outbox.try_reserve(size):
                if self.outgoing.offer(subject, payload, headers, 0.0):  # refused (and counted) when still full
                    return None
            else:
                self._pump.on_wake()
                await asyncio.sleep(0.002)

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
        await self.outgoing.flush(timeout)

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
        if (hook := _tracing.HOOK) is not None:  # read once: uninstrument() may clear it
            if type(headers) is not _tracing.Traced:
                return await hook.request_async(self.request, self, subject, payload, timeout, headers)
            headers = headers or None
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
        self._conn.adopt_loop()
        self._life.begin_close()
        await self._conn.close(limit, finish=self._closed)

    def _closed(self) -> None:
        """Closing is over, delivered or not: end the subscriptions, count what is left."""
        self._receivers.end_all(lambda receiver: receiver.sink.close(drain=True, timeout=0))
        left = self._pump.shutdown()
        if left:
            self._pump.report_dropped(left, "closed before they could be sent")
        self._life.closed()
        self.logger.info("cluster %s: closed (%s)", self.name, self.stats())
