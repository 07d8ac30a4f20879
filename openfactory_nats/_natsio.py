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

__all__ = (
    "abort_transport",
    "append_frames",
    "buffered_bytes",
    "prepend_frames",
    "supports_fast_path",
    "wait_writable",
    "write_pending_now",
)

_REQUIRED = ("_pending", "_pending_data_size", "_flush_queue", "_transport", "_status")


def supports_fast_path() -> bool:
    """Tell whether the installed nats-py exposes what the batched fast path needs."""
    if os.environ.get("OPENFACTORY_NATS_PUBLIC_API", "") not in ("", "0"):
        return False
    probe = Client()
    return all(hasattr(probe, attr) for attr in _REQUIRED) and isinstance(probe._pending, list)


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
