"""Moving queued messages into the nats-py client, with flow control and replay.

Publishing threads fill the :class:`~openfactory_nats._outbox.Outbox`; the event loop
moves its frames into nats-py's pending buffer while nats-py and the transport hold less
than a high-water mark, and a feeder task resumes when the transport's flow control says
the socket takes more. While the client reconnects, messages wait in the outbox, in
order, and the reconnection resumes the feeding.

Replay (at-least-once across a lost connection): every batch handed to the client stays
referenced until a PING sent after it is answered. When the connection drops, the
batches the server never confirmed are put back at the head of nats-py's reconnect
buffer, so a server crash loses (almost) nothing; the price is that a message the server
had processed but not yet confirmed can arrive twice (``stats()["replayed"]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from typing import Any

import nats.errors
from nats.aio.client import Client

from . import _natsio
from ._aio import bounded
from ._errors import map_nats_error
from ._outbox import Outbox
from ._stats import Stats

__all__ = ("Pump",)

_POLL_INTERVAL = 0.002
_CONFIRM_INTERVAL = 0.01
_MAX_CONFIRMING = 4
_HIGH_WATER = 4 * 1024 * 1024  # most bytes handed to nats-py and not yet on the socket
_PING_PATIENCE = 3600.0  # see Pump.ping


class Pump:
    """The loop side of one cluster's publishing.

    :param fast: hand ready-made frames to nats-py's buffer (else call its ``publish``).
    :param replay: keep unconfirmed batches for replay after a lost connection.
    """

    def __init__(
        self, cluster: str, logger: logging.Logger, max_pending_bytes: int, stats: Stats, *, fast: bool, replay: bool
    ) -> None:
        self.cluster = cluster
        self.logger = logger
        self.stats = stats
        self.fast = fast
        self.replay = replay and fast
        # Up to the high-water mark of bytes sits in nats-py's buffer and the transport;
        # writing it to the socket briefly copies it twice more. The outbox's budget leaves
        # room for that, so that the whole stays within max_pending_bytes.
        self.high_water = max(1024, min(_HIGH_WATER, max_pending_bytes // 16))
        capacity = max_pending_bytes - 2 * self.high_water
        self.outbox: Outbox[Any] = Outbox(capacity, self.wake, cluster, limit=max_pending_bytes)
        self.nc: Client | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: threading.Thread | None = None
        #: Bytes handed to the client and not yet given back to the budget.
        self.in_flight = 0
        self._feeder: asyncio.Task[None] | None = None
        self._public: asyncio.Task[None] | None = None
        self._confirmer: asyncio.Task[None] | None = None
        self._poll_handle: asyncio.TimerHandle | None = None
        self._pings: set[asyncio.Task[None]] = set()
        self._unconfirmed: list[list[bytes]] = []
        self._unconfirmed_bytes = 0
        self._confirming: deque[tuple[asyncio.Task[None], list[list[bytes]], int]] = deque()
        self._salvaged: list[bytes] = []

    # -- binding -------------------------------------------------------------------
    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on *loop* (called on its thread)."""
        self.loop = loop
        self.loop_thread = threading.current_thread()

    def attach(self, nc: Client) -> None:
        """Use the newly connected client *nc*; what was salvaged from a client whose
        event loop ended goes first."""
        self.nc = nc
        self._confirming.clear()
        frames, self._salvaged = self._salvaged, []
        nbytes = sum(map(len, frames))
        self.in_flight = nbytes
        self._unconfirmed, self._unconfirmed_bytes = ([frames], nbytes) if self.replay and frames else ([], 0)
        if frames:
            _natsio.prepend_frames(nc, frames, nbytes)
            self.stats.add("replayed", len(frames))
            if self.replay:
                self._confirmer = asyncio.get_running_loop().create_task(self._confirm(nc))

    def salvage(self) -> None:
        """The event loop of the current client has ended (its tasks are gone): keep the
        frames it never sent (with replay: never confirmed) for the next client."""
        nc, self.nc = self.nc, None
        self._feeder = self._public = self._confirmer = None
        self._poll_handle = None
        self._pings = set()
        self.outbox.scheduled = False
        kept: list[bytes] = []
        if nc is not None and self.fast:
            seen: set[int] = set()
            unconfirmed = [f for _, group, _ in self._confirming for batch in group for f in batch]
            unconfirmed += [f for batch in self._unconfirmed for f in batch]
            pending = [f for f in nc._pending if isinstance(f, bytes) and f.startswith((b"PUB ", b"HPUB "))]
            # What reached the kernel goes out on the old socket anyway; only when the
            # transport still held bytes can a written frame be missing (replay it then).
            stuck = _natsio.buffered_bytes(nc) > nc._pending_data_size
            for frame in (unconfirmed if self.replay and stuck else []) + pending:
                if id(frame) not in seen:
                    seen.add(id(frame))
                    kept.append(frame)
            with contextlib.suppress(Exception):
                _natsio.abort_transport(nc)
        elif nc is not None:
            unsent = int(getattr(nc, "_pending_data_size", 0))
            if unsent:
                self.stats.add("dropped_bytes", unsent)
                self.logger.error(
                    "cluster %s: %d bytes buffered by a client whose event loop ended were dropped",
                    self.cluster,
                    unsent,
                )
        self._confirming.clear()
        self._unconfirmed, self._unconfirmed_bytes = [], 0
        self._salvaged = kept + self._salvaged
        held = sum(map(len, self._salvaged))
        if self.in_flight > held:
            self.outbox.release(self.in_flight - held)
        self.in_flight = held

    def pending_work(self) -> bool:
        """True when messages wait to be handed to a client."""
        return bool(len(self.outbox) or self._salvaged)

    def usable(self, nc: Client | None) -> bool:
        return nc is not None and nc is self.nc and not nc.is_closed and not nc.is_draining

    # -- moving messages -----------------------------------------------------------
    def wake(self) -> None:
        """Ask the loop to move queued messages into the client (any thread)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            if threading.current_thread() is self.loop_thread:
                loop.call_soon(self.on_wake)
            else:
                loop.call_soon_threadsafe(self.on_wake)

    def on_wake(self) -> None:
        """Move what fits into the client (on the loop)."""
        nc = self.nc
        if nc is None or not self.usable(nc):
            self.outbox.scheduled = False
            return
        if not self.fast:
            if self._public is None or self._public.done():
                self._public = asyncio.get_running_loop().create_task(self._pump_public(nc))
            return
        if nc.is_connected:
            # Keep nats-py's buffer and the transport's small: what does not fit waits in
            # the outbox, budgeted, instead of being copied into ever larger socket writes.
            room = self.high_water - _natsio.buffered_bytes(nc)
            frames = self.outbox.take(room) if room > 0 else []
            if frames:
                nbytes = sum(map(len, frames))
                _natsio.append_frames(nc, frames, nbytes)
                self.in_flight += nbytes
                self.stats.add("published", len(frames))
                self.stats.add("bytes", nbytes)
                if self.replay:
                    self._unconfirmed.append(frames)
                    self._unconfirmed_bytes += nbytes
                    if self._unconfirmed_bytes >= self.high_water:
                        self._request_confirmation(nc)  # don't let a fast sender wait for the tick
                    if self._confirmer is None or self._confirmer.done():
                        self._confirmer = asyncio.get_running_loop().create_task(self._confirm(nc))
            if len(self.outbox) and (self._feeder is None or self._feeder.done()):
                self._feeder = asyncio.get_running_loop().create_task(self._feed(nc))
        else:
            self.outbox.scheduled = False  # reconnecting: on_reconnected resumes
        self.reconcile(nc)

    async def _pump_public(self, nc: Client) -> None:
        while len(self.outbox) and self.usable(nc):
            batch = self.outbox.take()
            for index, (subject, payload, headers, size) in enumerate(batch):
                try:
                    await nc.publish(subject, payload, headers=headers)
                except asyncio.CancelledError:
                    # The loop is shutting down under us: what was not handed over is lost.
                    rest = batch[index + 1 :]
                    if rest:
                        self.stats.add("dropped", len(rest))
                        self.stats.add("dropped_bytes", sum(len(item[1]) for item in rest))
                        self.logger.error(
                            "cluster %s: %d messages dropped: event loop stopped", self.cluster, len(rest)
                        )
                    raise
                except Exception as exc:
                    self.stats.add("dropped")
                    self.stats.add("dropped_bytes", len(payload))
                    error = map_nats_error(exc, self.cluster)
                    self.logger.error("cluster %s: message to %s dropped: %s", self.cluster, subject, error)
                else:
                    self.stats.add("published")
                    self.stats.add("bytes", len(payload))
                self.outbox.release(size)

    async def _feed(self, nc: Client) -> None:
        """Resume moving messages as the socket takes them (the transport's flow control
        wakes it; no polling)."""
        backlog = -1
        while len(self.outbox) and nc is self.nc and nc.is_connected:
            await asyncio.sleep(0)  # let nats-py's flusher write what it holds
            try:
                await _natsio.wait_writable(nc)
            except Exception:
                return  # the connection is going; on_reconnected resumes the feeding
            held = _natsio.buffered_bytes(nc)
            if held == backlog:  # the flusher made no progress: don't spin
                await asyncio.sleep(_POLL_INTERVAL)
            backlog = held
            self.on_wake()

    def reconcile(self, nc: Client) -> None:
        """Give back the budget of bytes that left the process (with replay: that the
        server confirmed); poll while producers wait for room."""
        if not self.replay:
            held = _natsio.buffered_bytes(nc)
            if held < self.in_flight:
                self.outbox.release(self.in_flight - held)
                self.in_flight = held
        if self.outbox.waiters and self._poll_handle is None and self.loop is not None:
            self._poll_handle = self.loop.call_later(_POLL_INTERVAL, self._poll)

    def _poll(self) -> None:
        self._poll_handle = None
        self.on_wake()

    async def pump_all(self, nc: Client, deadline: float) -> None:
        """Hand everything queued so far to the client, by *deadline* (loop time)."""
        loop = asyncio.get_running_loop()
        while nc.is_connected and loop.time() < deadline:
            self.on_wake()
            if self._public is not None and not self._public.done():
                await bounded(asyncio.shield(self._public), deadline - loop.time())
            if not len(self.outbox):
                return
            await asyncio.sleep(_POLL_INTERVAL)

    # -- confirmation and replay ---------------------------------------------------
    async def _confirm(self, nc: Client) -> None:
        """Every few milliseconds, confirm what was handed over since the last time."""
        while nc is self.nc and not nc.is_closed and (self._unconfirmed or self._confirming):
            await asyncio.sleep(_CONFIRM_INTERVAL)
            self._request_confirmation(nc)

    def _request_confirmation(self, nc: Client) -> None:
        """Confirm the batches handed over so far, unless enough pings are out already."""
        if self._unconfirmed and nc.is_connected and len(self._confirming) < _MAX_CONFIRMING:
            self._confirming_ping(nc)

    def _confirming_ping(self, nc: Client) -> asyncio.Task[None]:
        """Send a PING after the batches handed over so far; its PONG confirms them."""
        _natsio.write_pending_now(nc)  # the PING must follow the batches it confirms
        batches, nbytes = self._unconfirmed, self._unconfirmed_bytes
        self._unconfirmed, self._unconfirmed_bytes = [], 0
        ping = self._start_ping(nc, asyncio.get_running_loop())
        self._confirming.append((ping, batches, nbytes))
        ping.add_done_callback(self._on_pong)
        return ping

    def _on_pong(self, ping: asyncio.Task[None]) -> None:
        if ping.cancelled() or ping.exception() is not None:
            return  # the connection went: on_disconnected replays
        released = 0
        while self._confirming:
            head, _, nbytes = self._confirming.popleft()
            released += nbytes
            if head is ping:
                break
        self.in_flight -= released
        self.outbox.release(released)
        nc = self.nc
        if nc is not None and self._unconfirmed_bytes >= self.high_water:
            self._request_confirmation(nc)

    def on_disconnected(self, nc: Client) -> None:
        """The connection dropped: put what the server never confirmed back in front."""
        if not self.replay or nc is not self.nc:
            return
        batches = [batch for _, group, _ in self._confirming for batch in group] + self._unconfirmed
        for ping, _, _ in self._confirming:
            ping.cancel()  # its PONG future belonged to the lost connection
        self._confirming.clear()
        frames = [frame for batch in batches for frame in batch]
        self._unconfirmed = [frames] if frames else []
        self._unconfirmed_bytes = sum(map(len, frames))
        pending = {id(item) for item in nc._pending}
        resend = [frame for frame in frames if id(frame) not in pending]
        if resend:
            _natsio.prepend_frames(nc, resend, sum(map(len, resend)))
            self.stats.add("replayed", len(resend))
            self.logger.warning(
                "cluster %s: %d messages not yet confirmed by the server will be sent again after reconnecting",
                self.cluster,
                len(resend),
            )

    def on_reconnected(self, nc: Client) -> None:
        self.cancel_pings()  # nats-py dropped their PONG futures when it reconnected
        self.on_wake()  # send what waited during the outage

    def lose_in_flight(self, why: str) -> None:
        """The client dropped its buffer: count and log the loss."""
        lost, self.in_flight = self.in_flight, 0
        self._unconfirmed, self._unconfirmed_bytes = [], 0
        self._confirming.clear()
        self.outbox.release(lost)
        if lost:
            self.stats.add("dropped_bytes", lost)
            self.logger.error("cluster %s: %s; %d buffered bytes were dropped", self.cluster, why, lost)

    # -- pings ---------------------------------------------------------------------
    def _start_ping(self, nc: Client, loop: asyncio.AbstractEventLoop) -> asyncio.Task[None]:
        ping = loop.create_task(nc.flush(timeout=_PING_PATIENCE))  # type: ignore[arg-type]
        self._pings.add(ping)
        ping.add_done_callback(self._pings.discard)
        return ping

    async def ping(self, nc: Client, timeout: float) -> bool:
        """One PING/PONG round trip; False when no PONG came within *timeout* s.

        A late PING is left running rather than cancelled: nats-py 2.16 keeps a cancelled
        PONG future in its queue, and the PONG that finally arrives then kills its read loop
        (InvalidStateError). Orphaned pings are cancelled on reconnect and on close.
        """
        if self.replay and self._unconfirmed and nc.is_connected:
            ping = self._confirming_ping(nc)  # this round trip confirms the batches too
        else:
            ping = self._start_ping(nc, asyncio.get_running_loop())
        done, _ = await asyncio.wait({ping}, timeout=max(0.0, timeout))
        if not done:
            return False
        try:
            ping.result()
        except nats.errors.Error as exc:
            if isinstance(exc, nats.errors.FlushTimeoutError | nats.errors.ConnectionClosedError):
                return False
            raise map_nats_error(exc, self.cluster) from exc
        return True

    def cancel_pings(self) -> None:
        for ping in list(self._pings):
            ping.cancel()

    def shutdown(self) -> list[Any]:
        """Stop the background work; return the messages never handed to the client."""
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        for task in (self._feeder, self._confirmer):
            if task is not None:
                task.cancel()
        self.cancel_pings()
        self.in_flight = 0
        self._unconfirmed, self._unconfirmed_bytes = [], 0
        self._confirming.clear()
        left: list[Any] = self._salvaged + self.outbox.take()
        self._salvaged = []
        return left
