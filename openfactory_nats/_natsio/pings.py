"""PING/PONG round trips that are never cancelled.

nats-py keeps one future per outstanding PING in a queue and resolves the head when a
PONG arrives. A future cancelled while still queued (``Client.flush`` cancels its own on
timeout, and so would any task cancelled around it) makes that ``set_result`` raise and
kills nats-py's read loop. So the library never cancels a PING: each :class:`Ping` has
an ``outcome`` future of its own, set True by the PONG, or False by the library when the
connection the PING went out on is gone. Waiters wait on ``outcome`` (``asyncio.wait``
does not cancel it) and may give up at any time.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client

from .._wire import Frame
from . import internals

__all__ = ("Ping", "Pings")

_PATIENCE = 3600.0  # the public API's flush needs a timeout; it is never meant to expire


class Ping:
    """One PING in flight; ``batches``/``nbytes`` are what its PONG confirms."""

    __slots__ = ("batches", "nbytes", "outcome", "token")

    def __init__(self, outcome: asyncio.Future[bool], token: object) -> None:
        self.outcome = outcome
        self.token = token
        self.batches: list[list[bytes | Frame]] = []
        self.nbytes = 0

    @property
    def answered(self) -> bool:
        """True once its PONG arrived."""
        return self.outcome.done() and self.outcome.result()

    def resolve(self, answered: bool) -> None:
        if not self.outcome.done():
            self.outcome.set_result(answered)


class Pings:
    """The PINGs of one cluster that wait for their PONG.

    :param fast: write PINGs through :mod:`._natsio` (else through ``Client.flush``).
    """

    def __init__(self, fast: bool) -> None:
        self._fast = fast
        self._out: set[Ping] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, nc: Client) -> Ping | None:
        """Send a PING after everything handed to *nc* so far; None when not connected."""
        loop = asyncio.get_running_loop()
        if self._fast:
            sent = internals.send_ping(nc)
            if sent is None:
                return None
            wire, token = sent
            ping = Ping(loop.create_future(), token)
            wire.add_done_callback(lambda f: ping.resolve(not f.cancelled() and f.exception() is None))
        else:
            if not nc.is_connected:
                return None
            task = loop.create_task(nc.flush(timeout=_PATIENCE))  # type: ignore[arg-type]
            ping = Ping(loop.create_future(), None)
            self._tasks.add(task)
            task.add_done_callback(lambda t: self._done(t, ping))
        self._out.add(ping)
        ping.outcome.add_done_callback(lambda _: self._out.discard(ping))
        return ping

    def _done(self, task: asyncio.Task[None], ping: Ping) -> None:
        self._tasks.discard(task)
        ping.resolve(not task.cancelled() and task.exception() is None)

    def connection_lost(self) -> None:
        """The connection is gone: no outstanding PING will be answered."""
        for ping in list(self._out):
            ping.resolve(False)

    def reconnected(self, nc: Client) -> None:
        """*nc* is connected again: PINGs sent before the reconnection are lost, those
        already on the new connection (sent while nats-py was finishing it) are not."""
        for ping in list(self._out):
            if not self._fast or not internals.same_connection(nc, ping.token):
                ping.resolve(False)

    def close(self) -> None:
        """The client is closed (its read loop is gone): end the public API's flushes."""
        self.connection_lost()
        for task in list(self._tasks):
            task.cancel()

    def __len__(self) -> int:
        return len(self._out)
