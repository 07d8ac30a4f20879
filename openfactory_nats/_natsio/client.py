"""Making a nats-py client for a cluster, and turning its callbacks into events.

nats-py reports what happens to a connection through ``async`` callbacks. Here they are
wrapped so that the core's connection sees plain method calls (``_client_error``,
``_client_disconnected``, ...), each told which client it concerns, and the callbacks the
user passed are chained after the library's own.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import nats.errors
from nats.aio.client import Client

from .._errors import ConnectError
from .._redact import redact
from . import internals

__all__ = (
    "CALLBACKS",
    "ClientOwner",
    "describe",
    "is_limit_refusal",
    "is_refusal",
    "open_client",
    "refuses_subscription",
)

CALLBACKS = ("error_cb", "disconnected_cb", "reconnected_cb", "closed_cb", "discovered_server_cb", "lame_duck_mode_cb")


class ClientOwner(Protocol):
    """What a client's events are reported to: the connection of a core
    (``_core.connection.Connection``). Each event names the client it concerns, so that
    a late event of a replaced client can be recognised and ignored."""

    @property
    def name(self) -> str: ...

    @property
    def logger(self) -> logging.Logger: ...

    @property
    def _user_callbacks(self) -> Mapping[str, Callable[..., Awaitable[None]]]: ...

    def connect_timeout_error(self) -> Exception: ...

    def _client_error(self, nc: Client, exc: Exception) -> None: ...

    def _client_disconnected(self, nc: Client) -> None: ...

    def _client_reconnected(self, nc: Client) -> None: ...

    def _client_closed(self, nc: Client) -> None: ...

    def _client_discovered(self, nc: Client) -> None: ...

    def _client_lame_duck(self, nc: Client) -> None: ...

    def _client_malformed(self, subject: bytes, exc: Exception) -> None:
        """A received message could not be read (see ``internals.guard_messages``)."""


def is_refusal(exc: BaseException) -> bool:
    """True when retrying cannot help: credentials or certificates refused. nats-py 2.16
    reports an authorization violation as a plain ``nats.errors.Error`` while connecting."""
    if isinstance(exc, nats.errors.AuthorizationError | ssl.SSLCertVerificationError):
        return True
    text = str(exc).lower()
    return (
        "authorization violation" in text
        or "certificate verify failed" in text
        or ("authentication" in text and ("expired" in text or "timeout" in text or "fail" in text))
    )


def is_limit_refusal(exc: BaseException) -> bool:
    """True for the server's ``-ERR 'maximum subscriptions exceeded'``. It names no
    subscription, and nats-py closes its client on it (the server keeps the connection)."""
    return "maximum subscriptions exceeded" in str(exc).lower()


# The server's text (nats-server client.go, subPermissionViolation), subject and queue
# quoted with Go's %q; nats-py lowercases the whole line before it reports it.
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_SUB_REFUSAL = re.compile(rf"permissions violation for subscription to ({_QUOTED})(?: using queue ({_QUOTED}))?\Z")
_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def refuses_subscription(exc: BaseException, subject: str, queue: str | None) -> bool:
    """True when *exc* is the server's permissions refusal of a subscription to
    *subject* with *queue* (and not of another one, made at the same time).

    The comparison ignores case, as nats-py lowercases the server's message: two
    subscriptions made at once whose subjects differ only by case cannot be told apart.
    """
    match = _SUB_REFUSAL.search(str(exc).lower())
    if match is None:
        return False
    return match.groups() == (_go_quoted(subject).lower(), None if queue is None else _go_quoted(queue).lower())


def _go_quoted(text: str) -> str:
    """*text* as Go's ``strconv.Quote`` writes it (what the server's ``%q`` shows)."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char.isprintable():  # Python's notion matches Go's unicode.IsPrint
            out.append(char)
        elif char in _GO_ESCAPES:
            out.append(_GO_ESCAPES[char])
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def describe(exc: BaseException) -> str:
    return redact(str(exc) or type(exc).__name__)


async def open_client(cluster: ClientOwner, options: dict[str, Any], deadline: float) -> Client:
    """Connect a new client for *cluster* by *deadline* (loop time).

    :raises ConnectError: when the server refused (credentials, certificate) or the
        attempt failed.
    :raises ConnectTimeoutError: when no server answered in time.
    """
    loop = asyncio.get_running_loop()
    nc = Client()
    internals.guard_messages(nc, cluster._client_malformed)  # before its read loop starts
    refused: asyncio.Future[BaseException] = loop.create_future()
    task = loop.create_task(nc.connect(**options, **_callbacks(cluster, nc, refused)))
    waiting: set[asyncio.Future[Any]] = {task, refused}
    try:
        done, _ = await asyncio.wait(
            waiting, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
        )
    except asyncio.CancelledError:
        _abandon(nc, task)  # the caller gave up: leave no connection attempt behind
        raise
    finally:
        refused.cancel()
    if task not in done:
        _abandon(nc, task)
        await asyncio.wait({task}, timeout=0.5)
        if refused.done() and not refused.cancelled():
            raise ConnectError(
                f"cluster {cluster.name!r}: connection refused: {describe(refused.result())}", cluster=cluster.name
            ) from refused.result()
        raise cluster.connect_timeout_error()
    exc = task.exception()
    if exc is not None:
        _abandon(nc, task)
        raise ConnectError(
            f"cluster {cluster.name!r}: could not connect: {describe(exc)}", cluster=cluster.name
        ) from exc
    return nc


def _abandon(nc: Client, task: asyncio.Task[None]) -> None:
    task.cancel()
    internals.abort_transport(nc)


def _callbacks(cluster: ClientOwner, nc: Client, refused: asyncio.Future[BaseException]) -> dict[str, Any]:
    """The nats-py callbacks for client *nc*; *refused* gets the error that makes retrying
    pointless (credentials, certificate) while the first connection is made."""
    user = cluster._user_callbacks

    async def chain(key: str, *args: Any) -> None:
        callback = user.get(key)
        if callback is not None:
            try:
                await callback(*args)
            except Exception:
                cluster.logger.exception("cluster %s: %s raised", cluster.name, key)

    async def error_cb(exc: Exception) -> None:
        if is_refusal(exc) and not refused.done():
            refused.set_result(exc)
        cluster._client_error(nc, exc)
        await chain("error_cb", exc)

    async def disconnected_cb() -> None:
        cluster._client_disconnected(nc)
        await chain("disconnected_cb")

    async def reconnected_cb() -> None:
        cluster._client_reconnected(nc)
        await chain("reconnected_cb")

    async def closed_cb() -> None:
        cluster._client_closed(nc)
        await chain("closed_cb")

    async def discovered_server_cb() -> None:
        cluster._client_discovered(nc)
        await chain("discovered_server_cb")

    async def lame_duck_mode_cb() -> None:
        cluster._client_lame_duck(nc)
        await chain("lame_duck_mode_cb")

    return {
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
        "closed_cb": closed_cb,
        "discovered_server_cb": discovered_server_cb,
        "lame_duck_mode_cb": lame_duck_mode_cb,
    }
