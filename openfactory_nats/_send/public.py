"""The public-API write path: messages handed one at a time to nats-py's ``publish``.

The pump takes it when the installed nats-py lacks the internals of the batched path,
for websocket servers (nats-py's websocket transport sends only from its own flusher),
or when ``OPENFACTORY_NATS_PUBLIC_API`` is set. Its outbox then holds ``(subject,
payload, headers, size, reply)`` tuples instead of frames; nothing is replayed after a
lost connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client

from .._errors import map_nats_error
from .._stats import Stats
from .._wire import Frame
from .outbox import Outbox

__all__ = ("item_size", "pump_public")


async def pump_public(
    nc: Client,
    outbox: Outbox[Any],
    client: Callable[[], Client | None],
    late: Callable[[list[Any]], None],
    stats: Stats,
    logger: logging.Logger,
    cluster: str,
) -> None:
    """Publish what *outbox* holds through *nc*, while it is the attached client
    (*client*) and connected; *late* reports a message cut off by a stopping loop."""
    # Only while connected: during an outage messages wait in the outbox, within the
    # budget, so that a full buffer is refused to the caller (BufferFullError) rather
    # than dropped by nats-py's reconnect buffer after the caller saw success.
    while len(outbox) and nc is client() and nc.is_connected:
        item = outbox.take_upto(1, item_size)[0][0]
        subject, payload, headers, size, reply = item
        try:
            await nc.publish(subject, payload, reply=reply, headers=headers)
        except asyncio.CancelledError:
            late([item])  # the loop is shutting down under us
            raise
        except Exception as exc:
            stats.add("dropped")
            stats.add("dropped_bytes", len(payload))
            error = map_nats_error(exc, cluster)
            logger.error("cluster %s: message to %s dropped: %s", cluster, subject, error)
        else:
            stats.add("published")
            stats.add("bytes", len(payload))
        outbox.release(size)


def item_size(item: Any) -> int:
    """The size in bytes of an outbox item: a frame, or a public-API tuple."""
    return len(item) if isinstance(item, bytes | Frame) else int(item[3])
