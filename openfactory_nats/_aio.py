"""Small asyncio helpers that stay bounded with nats-py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Coroutine
from typing import Any

__all__ = ("bounded", "quiet")


async def bounded(awaitable: Awaitable[Any], timeout: float) -> bool:
    """Await *awaitable* for at most *timeout* s; cancel it (without waiting) if late.

    nats-py swallows cancellation in places, so ``asyncio.wait_for`` could hang.
    :returns: True when it finished in time (its exception, if any, is raised).
    """
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=max(0.0, timeout))
    if not done:
        task.cancel()
        return False
    task.result()
    return True


async def quiet(coro: Coroutine[Any, Any, None]) -> None:
    """Await *coro*, ignoring its errors (for best-effort clean-up)."""
    with contextlib.suppress(Exception):
        await coro
