"""The callbacks a cluster gives nats-py: logging, counting, replay and fail-fast."""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.client import Client

from ._redact import redact, redact_url

if TYPE_CHECKING:
    from ._cluster import NatsCluster

__all__ = ("callbacks_for", "describe", "is_refusal")


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


def describe(exc: BaseException) -> str:
    return redact(str(exc) or type(exc).__name__)


def callbacks_for(cluster: NatsCluster, nc: Client, refused: asyncio.Future[BaseException]) -> dict[str, Any]:
    """The nats-py callbacks for client *nc* of *cluster*; *refused* gets the error that
    makes retrying pointless (credentials, certificate) while the first connection is made.
    Callbacks the user passed are chained after ours."""
    user = cluster._user_callbacks

    async def chain(key: str, *args: Any) -> None:
        callback = user.get(key)
        if callback is not None:
            try:
                await callback(*args)
            except Exception:
                cluster.logger.exception("cluster %s: %s raised", cluster.name, key)

    def current() -> bool:
        return nc is cluster.nc and not cluster._closing and not cluster._closed

    async def error_cb(exc: Exception) -> None:
        cluster._stats.add("errors")
        cluster._last_error = exc
        if is_refusal(exc) and not refused.done():
            refused.set_result(exc)
        cluster.logger.warning("cluster %s: error: %s", cluster.name, describe(exc))
        await chain("error_cb", exc)

    async def disconnected_cb() -> None:
        if current():
            cluster._stats.add("disconnects")
            cluster.logger.warning("cluster %s: disconnected; buffering until reconnected", cluster.name)
            cluster._pump.on_disconnected(nc)
        await chain("disconnected_cb")

    async def reconnected_cb() -> None:
        cluster._stats.add("reconnects")
        cluster._max_payload = nc.max_payload or cluster._max_payload
        cluster.logger.info("cluster %s: reconnected to %s", cluster.name, cluster._server_of(nc))
        if nc is cluster.nc:
            cluster._pump.on_reconnected(nc)
        await chain("reconnected_cb")

    async def closed_cb() -> None:
        if current():
            cluster.ready = False
            cluster._pump.lose_in_flight("nats-py closed the connection for good")
            cluster.logger.error(
                "cluster %s: connection closed by the client; will reconnect on next use", cluster.name
            )
        await chain("closed_cb")

    async def discovered_server_cb() -> None:
        found = [redact_url(s.geturl()) for s in nc.discovered_servers]
        cluster.logger.info("cluster %s: discovered servers %s", cluster.name, found)
        await chain("discovered_server_cb")

    async def lame_duck_mode_cb() -> None:
        cluster.logger.warning(
            "cluster %s: server %s entered lame-duck mode; moving to another server",
            cluster.name,
            cluster._server_of(nc),
        )
        if current():
            # Leave before the server closes the connection, so that nothing is cut off.
            asyncio.get_running_loop().create_task(nc.force_reconnect())
        await chain("lame_duck_mode_cb")

    return {
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
        "closed_cb": closed_cb,
        "discovered_server_cb": discovered_server_cb,
        "lame_duck_mode_cb": lame_duck_mode_cb,
    }
