"""The pump's dealings with a connection's transport, beyond writing frames to it.

:func:`feed` resumes moving messages as the socket takes them: the transport's flow
control wakes it, with no polling. :func:`watch_close` looks after a connection that is
going: nats-py, before reconnecting, waits until the closing transport has written what
it holds, which into a peer that stopped reading is for ever. :func:`unsent_frames`
tells what the transport of a client whose event loop ended never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client

from .._natsio import internals
from .outbox import Outbox

__all__ = ("POLL_INTERVAL", "feed", "unsent_frames", "watch_close")

POLL_INTERVAL = 0.002


async def feed(
    nc: Client,
    outbox: Outbox[Any],
    replay: deque[Any],
    client: Callable[[], Client | None],
    move: Callable[[], None],
    fast: bool,
) -> None:
    """While *outbox* or *replay* holds frames and *nc* is the attached, connected
    client, *move* them each time the socket takes more (the pump's ``on_wake``)."""
    backlog = -1
    while (len(outbox) or replay) and nc is client() and nc.is_connected:
        if fast and internals.transport_closing(nc):
            return  # the socket is gone; on_reconnected resumes the feeding
        await asyncio.sleep(0)  # let nats-py's flusher write what it holds
        try:
            await internals.wait_writable(nc)
        except Exception:
            return  # the connection is going; on_reconnected resumes the feeding
        held = internals.buffered_bytes(nc)
        if held and held == backlog:  # the socket took nothing since: don't spin
            await asyncio.sleep(POLL_INTERVAL)
        backlog = held
        move()


async def watch_close(nc: Client, client: Callable[[], Client | None], logger: logging.Logger, cluster: str) -> None:
    """What a closing transport holds is replayed or counted as lost in any case: once
    it stops draining, drop it, so that nats-py can move on and reconnect."""
    held = -1
    for _ in range(100):  # up to 5 s: nats-py moves on, or it is stuck
        await asyncio.sleep(0.05)
        if nc is not client() or nc.is_closed or nc.is_connected:
            return
        stuck = internals.stuck_bytes(nc)
        if stuck and stuck == held:
            logger.warning(
                "cluster %s: the lost connection's socket took nothing for 50 ms; dropping the %d bytes it held",
                cluster,
                stuck,
            )
            internals.drop_transport(nc)
            return
        held = stuck


def unsent_frames(nc: Client, waiting: list[Any], unconfirmed: list[Any], replay: bool) -> tuple[list[Any], int]:
    """The event loop of client *nc* has ended: abort its transport, and return the
    frames to write on the next client (*waiting* ones, and with *replay* the
    *unconfirmed* ones the transport may not have sent), once each, and the bytes of ours
    the transport still held (never sent)."""
    kept: list[Any] = []
    seen: set[int] = set()
    # Frames are written to the transport directly, never left in nats-py's pending
    # buffer. What reached the kernel goes out on the old socket anyway; only when
    # the transport still held bytes can a written frame be missing (replay it then).
    stuck = max(0, internals.buffered_bytes(nc) - internals.pending_bytes(nc))
    for frame in waiting + (unconfirmed if replay and stuck else []):
        if id(frame) not in seen:
            seen.add(id(frame))
            kept.append(frame)
    with contextlib.suppress(Exception):
        internals.abort_transport(nc)
    return kept, stuck
