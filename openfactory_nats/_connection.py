"""Making a nats-py client for a cluster, and turning its callbacks into events.

nats-py reports what happens to a connection through ``async`` callbacks. Here they are
wrapped so that the cluster sees plain method calls (``_client_error``,
``_client_disconnected``, ...), each told which client it concerns, and the callbacks the
user passed are chained after the library's own.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.client import Client

from . import _natsio
from ._errors import ConnectError
from ._redact import redact

if TYPE_CHECKING:
    from ._cluster import NatsCluster

__all__ = ("CALLBACKS", "describe", "is_refusal", "is_subscription_refusal", "open_client")

CALLBACKS = ("error_cb", "disconnected_cb", "reconnected_cb", "closed_cb", "discovered_server_cb", "lame_duck_mode_cb")


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


def is_subscription_refusal(exc: BaseException) -> bool:
    """True for the server's refusal of a subscription (permissions, limits)."""
    text = str(exc).lower()
    return "permissions violation for subscription" in text or "maximum subscriptions exceeded" in text


def describe(exc: BaseException) -> str:
    return redact(str(exc) or type(exc).__name__)


async def open_client(cluster: NatsCluster, options: dict[str, Any], deadline: float) -> Client:
    """Connect a new client for *cluster* by *deadline* (loop time).

    :raises ConnectError: when the server refused (credentials, certificate) or the
        attempt failed.
    :raises ConnectTimeoutError: when no server answered in time.
    """
    loop = asyncio.get_running_loop()
    nc = Client()
    _natsio.guard_messages(nc, cluster._receivers.on_malformed)  # before its read loop starts
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
    _natsio.abort_transport(nc)


def _callbacks(cluster: NatsCluster, nc: Client, refused: asyncio.Future[BaseException]) -> dict[str, Any]:
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
