"""The few places where the library reaches into nats-py's client.

nats-py builds one protocol frame per ``publish`` and wakes its flusher task each time.
The fast path instead appends frames that were built in the publishing threads to the
client's pending buffer in batches, which is what ``publish`` does internally, minus the
per-message overhead. It relies on private attributes of ``nats.aio.client.Client``;
:func:`supports_fast_path` checks that they are there (tested against the nats-py range
that ``setup.cfg`` pins), and the library falls back to the public ``publish`` when they
are not, or when ``OPENFACTORY_NATS_PUBLIC_API=1`` is set.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from nats.aio.client import Client
from nats.aio.subscription import Subscription

__all__ = (
    "abort_transport",
    "append_frames",
    "buffered_bytes",
    "connection_token",
    "divert_pending",
    "drain_subscription",
    "pending_bytes",
    "pending_ids",
    "pending_publish_frames",
    "prepend_frames",
    "remove_frames",
    "same_connection",
    "send_ping",
    "supports_fast_path",
    "wait_writable",
    "write_pending_now",
)

_PING = b"PING\r\n"

_REQUIRED = ("_pending", "_pending_data_size", "_flush_queue", "_transport", "_status", "_pongs")


def supports_fast_path() -> bool:
    """Tell whether the installed nats-py exposes what the batched fast path needs."""
    if os.environ.get("OPENFACTORY_NATS_PUBLIC_API", "") not in ("", "0"):
        return False
    probe = Client()
    if not all(hasattr(probe, attr) for attr in _REQUIRED) or not isinstance(probe._pending, list):
        return False
    try:
        sub = Subscription(probe, pending_msgs_limit=0)
    except TypeError:
        return False
    return isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue)


async def drain_subscription(nc: Client, sub: Subscription, timeout: float) -> bool:
    """Unsubscribe *sub* so that what the server sent before is still received: UNSUB,
    then a PING that is never cancelled (the messages routed before the UNSUB arrive
    before its PONG), then forget the subscription. nats-py's own ``drain`` waits with a
    flush that, timed out or cancelled, leaves a cancelled future in its PONG queue and
    so kills its read loop. True when the PONG came within *timeout* s.
    """
    answered = False
    if nc.is_connected:
        await nc._send_unsubscribe(sub._id)
        sent = send_ping(nc)
        if sent is not None:
            done, _ = await asyncio.wait({sent[0]}, timeout=max(0.0, timeout))
            answered = bool(done)
    nc._remove_sub(sub._id)
    sub._closed = True
    return answered


def divert_pending(sub: Subscription, queue: Any) -> None:
    """Make nats-py hand the messages of *sub* (a subscription without callback) to
    *queue*, which has ``put_nowait``, ``qsize``, ``empty``, ``task_done`` and an async
    ``join``: the receiver batches them itself instead of nats-py's per-message queue."""
    sub._pending_queue = queue


def append_frames(nc: Client, frames: list[bytes], nbytes: int) -> None:
    """Queue ready-made ``PUB``/``HPUB`` frames in the client's pending buffer, in order.

    While the client is reconnecting they stay there, as nats-py's reconnect buffer, and
    are written once it is connected again; while connected the flusher task is woken.
    """
    nc._pending.extend(frames)
    nc._pending_data_size += nbytes
    queue: asyncio.Queue[Any] | None = nc._flush_queue
    if nc.is_connected and queue is not None and queue.empty():
        queue.put_nowait(asyncio.get_running_loop().create_future())


async def wait_writable(nc: Client) -> None:
    """Wait while the transport's buffer is over its high-water mark (asyncio flow control)."""
    if nc._transport is not None:
        await nc._transport.drain()  # type: ignore[no-untyped-call]


def prepend_frames(nc: Client, frames: list[bytes], nbytes: int) -> None:
    """Put frames at the head of the client's pending buffer (sent first on reconnect)."""
    nc._pending[0:0] = frames
    nc._pending_data_size += nbytes


def write_pending_now(nc: Client) -> None:
    """Hand the client's pending buffer to the transport at once.

    ``Client.flush`` writes its PING straight to the socket, ahead of whatever is still
    pending; writing the pending buffer first keeps "flushed" true.
    """
    if nc.is_connected and nc._pending_data_size > 0 and nc._transport:
        nc._transport.writelines(nc._pending[:])
        nc._pending = []
        nc._pending_data_size = 0


def send_ping(nc: Client) -> tuple[asyncio.Future[Any], object] | None:
    """Write the pending buffer, then a PING; return the future nats-py resolves when
    the PONG arrives and a token naming the connection it went out on (see
    :func:`same_connection`), or None when the client is not connected.

    Unlike ``Client.flush``, nothing here is ever cancelled: a cancelled future left in
    nats-py's PONG queue kills its read loop when the PONG arrives. Callers wait on the
    returned future with ``asyncio.wait`` (which does not cancel it) and forget it when
    its connection is gone; nats-py drops the queue of a lost connection on reconnect.
    """
    if not nc.is_connected or nc._transport is None:
        return None
    write_pending_now(nc)
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    pongs = nc._pongs
    pongs.append(future)
    nc._transport.write(_PING)
    return future, pongs


def connection_token(nc: Client) -> object:
    """An object that names the client's current connection (nats-py starts a new PONG
    queue for each connection it makes, reconnection attempts included)."""
    return nc._pongs


def remove_frames(nc: Client, ids: set[int]) -> None:
    """Take the items whose identity is in *ids* out of the client's pending buffer."""
    if not ids:
        return
    kept = [item for item in nc._pending if id(item) not in ids]
    if len(kept) != len(nc._pending):
        nc._pending = kept
        nc._pending_data_size = sum(map(len, kept))


def same_connection(nc: Client, token: object) -> bool:
    """True while the connection a ping's *token* names is still the client's (nats-py
    starts a new PONG queue for every connection it makes)."""
    return nc._pongs is token


def pending_bytes(nc: Client) -> int:
    """Bytes in the client's pending buffer (its reconnect buffer while reconnecting)."""
    return int(nc._pending_data_size)


def pending_ids(nc: Client) -> set[int]:
    """Identities of the items in the client's pending buffer."""
    return {id(item) for item in nc._pending}


def pending_publish_frames(nc: Client) -> list[bytes]:
    """The ``PUB``/``HPUB`` frames still in the client's pending buffer."""
    return [f for f in nc._pending if isinstance(f, bytes) and f.startswith((b"PUB ", b"HPUB "))]


def _asyncio_transport(nc: Client) -> asyncio.WriteTransport | None:
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    transport = getattr(writer, "transport", None)
    return transport if isinstance(transport, asyncio.WriteTransport) else None


def buffered_bytes(nc: Client) -> int:
    """Bytes held by the client that have not reached the socket: its pending buffer plus
    the transport's write buffer."""
    pending = int(getattr(nc, "_pending_data_size", 0))
    transport = _asyncio_transport(nc)
    if transport is not None and not transport.is_closing():
        pending += transport.get_write_buffer_size()
    return pending


def abort_transport(nc: Client) -> None:
    """Drop the client's connection at once, without flushing (a stalled peer)."""
    transport = _asyncio_transport(nc)
    if transport is not None:
        transport.abort()
    if hasattr(nc, "_status"):
        nc._status = Client.CLOSED
