"""The send side of :class:`~openfactory_nats.NatsCluster`: validating and queueing
messages, acknowledged publishing, and confirming what was sent (flush).

:class:`Outgoing` is one object per core, as :class:`~.incoming.Incoming` is for the
receive side. Publishing threads call :meth:`Outgoing.offer` directly (the blocking
facade does), with no call in between; ``NatsCluster.publish`` keeps its own loop for
the same reason. What it needs of the core (its settings, the life cycle, the pump, the
counters, the connection) is handed to it when it is made, and nothing else is read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from nats.aio.client import Client

from .._errors import BufferFullError, ClusterTimeoutError, ClusterUnavailableError
from .._natsio import internals
from .._send.acked import MSG_ID_HEADER, PubAck, check_msg_id, new_msg_id, publish_acked
from .._send.pump import Pump
from .._stats import Stats
from .._wire import SPLIT_PAYLOAD, WireSubject, build_frame, check_timeout, frame_size, payload_bytes, split_frame
from .connection import Connection, Settings
from .lifecycle import Lifecycle, Phase

__all__ = ("DEFAULT_ACK_TIMEOUT", "Outgoing", "uses_fast_path")

DEFAULT_ACK_TIMEOUT = 10.0
_UNKNOWN_MAX_PAYLOAD = 64 * 1024 * 1024  # before the first connection: the protocol's limit
_LARGE = 64 * 1024  # payloads above this reserve their room before their frame is built
_POLL = 0.01
_OPEN = Phase.OPEN
_warned_public_api = False

Item = Any  # a frame (fast path) or a (subject, payload, headers, size, reply) tuple (public-API path)


def uses_fast_path(name: str, servers: list[str], logger: logging.Logger) -> bool:
    """Whether the cluster hands ready-made frames to nats-py's transport (else it
    publishes through nats-py's public API); says why not, once, when it cannot."""
    websocket = any(url.startswith(("ws://", "wss://")) for url in servers)
    fast = internals.supports_fast_path() and not websocket
    if websocket:
        # nats-py's websocket transport sends only from its own flusher.
        logger.info("cluster %s: websocket servers: publishing through nats-py's public API", name)
    elif not fast:
        _warn_public_api(logger)
    return fast


class Outgoing:
    """Publishing and flushing, for one :class:`~openfactory_nats.NatsCluster`.

    :param settings: the core (its name and ``connect_timeout``, read when needed).
    :param conn: the core's connection (connecting, the server's ``max_payload``,
        the JetStream context).
    :param fast: hand ready-made frames to nats-py (see :func:`uses_fast_path`).
    :param attached: the client messages go to now, or None.
    :param adopt_loop: bind the core to the running event loop.
    :param lost_error: the error for an operation (named) that found no client.
    """

    def __init__(
        self,
        settings: Settings,
        life: Lifecycle,
        pump: Pump,
        stats: Stats,
        conn: Connection,
        *,
        fast: bool,
        attached: Callable[[], Client | None],
        adopt_loop: Callable[[], None],
        lost_error: Callable[[str], ClusterUnavailableError],
    ) -> None:
        self._settings = settings
        self._life = life
        self._pump = pump
        self._stats = stats
        self._conn = conn
        self._fast = fast
        self._attached = attached
        self._adopt_loop = adopt_loop
        self._lost_error = lost_error

    def prepare(self, subject: object, payload: object, headers: object, max_payload: int | None = None) -> int:
        """Validate a message (any thread) and return its frame's size in bytes (see
        ``NatsCluster.prepare``)."""
        if max_payload is None:
            max_payload = self._conn.max_payload if self._life.ever_open else _UNKNOWN_MAX_PAYLOAD
        return frame_size(subject, payload, headers, max_payload)

    def offer(self, subject: object, payload: object, headers: object, timeout: float) -> bool:
        """Validate a message and queue it, from any thread (see ``NatsCluster.offer``)."""
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
                    frame = build_frame(subject, payload, headers, self._conn.max_payload)
                    outbox.put(frame, len(frame), timeout)
                    return True
                if size > _LARGE:
                    # Make room before building a large frame, so that nothing waits
                    # outside the budget: the cap is on memory.
                    outbox.reserve(frame_size(subject, payload, headers, self._conn.max_payload), timeout)
                # Not copied: the frame references the (immutable) payload.
                large = split_frame(subject, payload, headers, self._conn.max_payload)
                outbox.put(large, large.size, timeout)
            else:
                frame = build_frame(subject, payload, headers, self._conn.max_payload)  # validation only
                copied = dict(headers) if isinstance(headers, Mapping) else None
                name = subject.decode() if isinstance(subject, WireSubject) else subject
                outbox.put((name, payload_bytes(payload), copied, len(frame), ""), len(frame), timeout)
        except BufferFullError:
            self._stats.add("refused")
            raise
        return True

    async def publish_acked(
        self, subject: str, payload: bytes, headers: Mapping[str, str] | None, msg_id: str | None, wait: float
    ) -> PubAck:
        """Publish into JetStream within *wait* s and return the stream's acknowledgement
        (``NatsCluster.publish`` with ``ack=True``, once the message is validated)."""
        ident = new_msg_id() if msg_id is None else check_msg_id(msg_id)
        self._adopt_loop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        if not self._life.accepting:
            await self._conn.connect(min(self._settings.connect_timeout, wait))
        # The server counts the headers, ours included, against max_payload.
        build_frame(subject, payload, {**(headers or {}), MSG_ID_HEADER: ident}, self._conn.max_payload)
        # What was queued before goes first, also during an outage: JetStream's request
        # would otherwise wait in nats-py's reconnect buffer, ahead of our outbox.
        await self.pump_before(self._pump.outbox.mark(), deadline, "acknowledged publish")
        ack = await publish_acked(
            self._settings.name,
            self._conn.jetstream,
            subject,
            payload_bytes(payload),
            headers,
            ident,
            max(0.0, deadline - loop.time()),
        )
        self._stats.add("acked")
        return ack

    # -- handing over and confirming -------------------------------------------------
    async def pump_before(self, mark: int, deadline: float, what: str) -> None:
        """Hand the client everything queued before *mark*, waiting for a reconnection
        if need be, by *deadline*."""
        loop = asyncio.get_running_loop()
        while not await self._pump.pump_to(mark, deadline):
            self._life.check_open()
            if self._attached() is None:
                raise self._lost_error(what)
            if loop.time() >= deadline:
                raise ClusterTimeoutError(
                    f"cluster {self._settings.name!r}: {what}: the messages queued before it could not be sent in time",
                    cluster=self._settings.name,
                )
            await asyncio.sleep(_POLL)

    async def flush(self, timeout: float) -> None:
        """Confirm everything queued so far within *timeout* s (see ``NatsCluster.flush``)."""
        self._life.check_open()
        timeout = check_timeout(timeout)
        self._adopt_loop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not self._life.accepting:
            if not self._pump.pending_work() and self._conn.nc is None:
                return
            await self._conn.connect(min(self._settings.connect_timeout, timeout))
        mark = self._pump.outbox.mark()
        rounds = 1 if self._fast else 2  # nats-py's own PING may overtake what it holds
        while True:
            self._life.check_open()
            nc = self._attached()
            if nc is None:
                raise self._lost_error("flush")
            if loop.time() >= deadline:
                raise ClusterTimeoutError(
                    f"cluster {self._settings.name!r}: flush did not complete within {timeout:g} s",
                    cluster=self._settings.name,
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


def _warn_public_api(logger: logging.Logger) -> None:
    global _warned_public_api
    if not _warned_public_api:
        _warned_public_api = True
        logger.warning(
            "openfactory-nats: using nats-py's public publish API (slower; no replay of unconfirmed "
            "messages after a lost connection): the installed nats-py lacks the internals of the "
            "batched path, or OPENFACTORY_NATS_PUBLIC_API is set"
        )
