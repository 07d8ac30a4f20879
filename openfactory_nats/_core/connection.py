"""The connection of one :class:`~openfactory_nats.NatsCluster`: its nats-py client, one
at a time, from its making to its closing.

:class:`Connection` binds the core to the event loop it runs on (and starts afresh when
that loop has ended), makes the client (one attempt at a time, within a deadline), follows
its events (it is the :class:`~openfactory_nats._natsio.client.ClientOwner`), connects
again by itself while subscriptions wait for a client, and drains and closes the client
at the end. It keeps what the server said (``max_payload``) and the last error. What it
needs of the core (its settings, the life cycle, the pump, the counters, the receivers)
is handed to it when it is made; the phase stays the life cycle's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import nats.errors
from nats.aio.client import Client

from .._aio import bounded, quiet
from .._errors import (
    ClusterUnavailableError,
    ConnectTimeoutError,
    InvalidMessageError,
    InvalidTypeError,
    WrongThreadError,
)
from .._natsio import internals
from .._natsio.client import describe, open_client
from .._receive.receivers import Receivers
from .._redact import redact_url
from .._send.pump import Pump
from .._stats import Stats
from .lifecycle import Lifecycle

__all__ = ("DEFAULT_MAX_PAYLOAD", "Connection", "Settings", "check_settings")

DEFAULT_MAX_PAYLOAD = 1024 * 1024
_RESERVED = ("servers", "allow_reconnect", "max_reconnect_attempts", "pending_size")


def check_settings(
    name: object, servers: Sequence[str] | str, max_pending_bytes: object, options: Mapping[str, Any]
) -> list[str]:
    """Check a core's name, servers, budget and nats-py options (in the caller's thread);
    return the server URLs.

    :raises InvalidTypeError: for a name that is not a non-empty str.
    :raises InvalidMessageError: for no server or an empty URL, a budget below 64 KiB,
        or an option the library manages itself.
    """
    if not isinstance(name, str) or not name:
        raise InvalidTypeError("name must be a non-empty str", cluster=None)
    urls = [servers] if isinstance(servers, str) else list(servers)
    if not urls or not all(isinstance(u, str) and u.strip() for u in urls):
        raise InvalidMessageError(f"cluster {name!r}: servers must be non-empty URL strings", cluster=name)
    if isinstance(max_pending_bytes, bool) or not isinstance(max_pending_bytes, int) or max_pending_bytes < 64 * 1024:
        raise InvalidMessageError(f"cluster {name!r}: max_pending_bytes must be an int >= 65536", cluster=name)
    for key in _RESERVED:
        if key in options:
            raise InvalidMessageError(f"cluster {name!r}: option {key!r} is managed by the library", cluster=name)
    return [u.strip() for u in urls]


class Settings(Protocol):
    """What a connection reads of its core's settings, when it needs them (they are the
    core's public attributes: a change between two connections is seen by the next)."""

    @property
    def name(self) -> str: ...

    @property
    def logger(self) -> logging.Logger: ...

    @property
    def servers(self) -> list[str]: ...

    @property
    def reconnect_time_wait(self) -> float: ...

    @property
    def connect_timeout(self) -> float: ...

    @property
    def max_pending_bytes(self) -> int: ...


class Connection:
    """The nats-py client of one core, and what the server told about itself.

    :param settings: the core (its name, logger, servers and timeouts, read when needed).
    :param options: passed on to ``nats.connect`` (checked; without the callbacks).
    :param user_callbacks: the user's nats-py callbacks, called after the library's own.
    :param attached: the client messages go to now, or None (the core's ``_attached``).
    :param lost: called when nats-py gave the client up for good (to end the requests
        waiting for a reply with it).
    :param fast: the core hands frames to nats-py's transport (see ``internals``).
    """

    def __init__(
        self,
        settings: Settings,
        life: Lifecycle,
        pump: Pump,
        stats: Stats,
        receivers: Receivers,
        *,
        options: dict[str, Any],
        user_callbacks: Mapping[str, Callable[..., Awaitable[None]]],
        attached: Callable[[], Client | None],
        lost: Callable[[], None],
        fast: bool,
    ) -> None:
        self._settings = settings
        self._life = life
        self._pump = pump
        self._stats = stats
        self._receivers = receivers
        self._options = options
        self._user_callbacks = user_callbacks
        self._attached = attached
        self._lost = lost
        self._fast = fast
        #: The client, once made (replaced when nats-py gives up on it or its loop ends).
        self.nc: Client | None = None
        #: The event loop the core runs on (see :meth:`adopt_loop`).
        self.loop: asyncio.AbstractEventLoop | None = None
        #: Held by a connection attempt, and by closing.
        self.lock = asyncio.Lock()
        #: The server's ``max_payload`` (1 MiB until the first connection).
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self._js: Any = None
        self._revive: asyncio.Task[None] | None = None
        self._last_error: BaseException | None = None
        self._close_task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        """The core's name."""
        return self._settings.name

    @property
    def logger(self) -> logging.Logger:
        """The core's logger."""
        return self._settings.logger

    def adopt_loop(self) -> None:
        """Bind to the running loop; after the previous loop ended (``asyncio.run`` per
        call, as in the original's documentation), start afresh on this one and keep
        what the old client never sent."""
        loop = asyncio.get_running_loop()
        previous = self.loop
        if previous is loop:
            return
        if previous is not None and not previous.is_closed():
            raise WrongThreadError(f"cluster {self.name!r} is bound to another running event loop", cluster=self.name)
        if previous is not None:
            nc, self.nc, self._js = self.nc, None, None
            self._life.loop_ended()
            self._pump.salvage(nc)
            self.lock = asyncio.Lock()
            self._close_task = None
        self.loop = loop

    def jetstream(self) -> Any:
        """The JetStream context of the attached client, or None when none is open."""
        nc = self._attached()
        if nc is None or not self._life.accepting:
            return None
        if self._js is None:
            self._js = nc.jetstream()
        return self._js

    # -- connecting ----------------------------------------------------------------
    async def connect(self, timeout: float) -> None:
        """Connect within *timeout* s, unless a client is open (see ``NatsCluster.connect``)."""
        if self._life.accepting:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await asyncio.wait_for(self.lock.acquire(), timeout)
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
            self.max_payload = nc.max_payload or DEFAULT_MAX_PAYLOAD
            self._pump.attach(nc)
            self._life.connected()  # raises ClusterClosedError if close() began meanwhile
            self.logger.info("cluster %s: connected to %s", self.name, self._server_of(nc))
            if self._receivers.any():
                await self._receivers.attach_all(nc)
        finally:
            self.lock.release()
        self._pump.on_wake()

    def _connect_options(self) -> dict[str, Any]:
        self._last_error = None
        return {
            "name": self.name,
            "ping_interval": 10,
            "flush_timeout": self._settings.connect_timeout,
            **self._options,
            "servers": self._settings.servers,
            "reconnect_time_wait": self._settings.reconnect_time_wait,
            "connect_timeout": self._settings.connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "pending_size": self._settings.max_pending_bytes,
        }

    def connect_timeout_error(self, timeout: float | None = None) -> ConnectTimeoutError:
        """The error for a connection not made within *timeout* s (``connect_timeout``)."""
        servers = ", ".join(redact_url(u) for u in self._settings.servers)
        seconds = self._settings.connect_timeout if timeout is None else timeout
        last = f"; last error: {describe(self._last_error)}" if self._last_error is not None else ""
        return ConnectTimeoutError(
            f"cluster {self.name!r}: could not connect to [{servers}] within {seconds:g} s{last}", cluster=self.name
        )

    @property
    def peer(self) -> tuple[str, int] | None:
        """The host and port of the server connected to now, or None (any thread)."""
        nc = self.nc
        url = nc.connected_url if nc is not None and nc.is_connected else None
        return (url.hostname or "", url.port or 4222) if url is not None else None

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
        self.max_payload = nc.max_payload or self.max_payload
        self.logger.info("cluster %s: reconnected to %s", self.name, self._server_of(nc))
        if nc is self._attached():
            self._pump.on_reconnected(nc)

    def _client_closed(self, nc: Client) -> None:
        if nc is self.nc and self._life.lost():
            self._pump.lose_in_flight("nats-py closed the connection for good")
            self._lost()  # the requests waiting for a reply are gone with the connection
            if len(self._receivers):  # subscribers make no next call: come back by ourselves
                self.logger.error("cluster %s: connection closed by the client; reconnecting", self.name)
                self._revive = asyncio.get_running_loop().create_task(self._reconnect_receivers())
            else:
                self.logger.error("cluster %s: connection closed by the client; will reconnect on next use", self.name)

    async def _reconnect_receivers(self) -> None:
        """Connect again (backing off) while subscriptions wait for a client."""
        while not self._life.closing and not self._life.accepting and len(self._receivers):
            await asyncio.sleep(max(0.05, self._settings.reconnect_time_wait))
            try:
                await self.connect(self._settings.connect_timeout)  # subscribes them all again
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

    # -- closing -----------------------------------------------------------------------
    async def close(self, limit: float, finish: Callable[[], None]) -> None:
        """Deliver what is held and close the client within *limit* s, then *finish* (the
        core's part: end the subscriptions, count what is left), in any case, before a
        connection attempt may start again. One closing serves every caller."""
        if self._close_task is None:
            deadline = asyncio.get_running_loop().time() + limit
            self._close_task = asyncio.get_running_loop().create_task(self._close(deadline, finish))
        await asyncio.shield(self._close_task)

    async def _close(self, deadline: float, finish: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        locked = False
        try:
            # A connection attempt in progress ends first (or runs out of time).
            if self.lock.locked():
                locked = await bounded(self.lock.acquire(), deadline - loop.time())
            else:
                locked = await self.lock.acquire()  # free: taken at once, whatever the deadline
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
            finish()
            if locked:
                self.lock.release()

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
