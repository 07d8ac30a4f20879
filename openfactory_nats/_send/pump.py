"""Moving queued messages into the nats-py client, with flow control and replay.

Publishing threads fill the :class:`~openfactory_nats._send.outbox.Outbox`; the event loop
writes its frames to the connection's transport (after nats-py's own pending commands,
see ``internals.write_frames``) while nats-py and the transport hold less than a
high-water mark, and a feeder task resumes when the transport's flow control says the
socket takes more. Large payloads are not copied on the way: their frames reference them
and the socket write gathers the pieces. While the client reconnects, messages wait in
the outbox, in order, and the reconnection resumes the feeding.

Replay (at-least-once across a lost connection): every batch written stays referenced
until a PING sent after it is answered. When the connection drops, the batches the
server never confirmed are kept, and written first once nats-py has reconnected, in
slices, so a server crash loses (almost) nothing; the price is that a message the server
had processed but not yet confirmed can arrive twice (``stats()["replayed"]``).

The pump holds no client of its own: it asks its owner (``client()``) for the one that
is attached, which is None unless the cluster's life cycle says a client is open.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client

from .._natsio import internals
from .._natsio.pings import Ping, Pings
from .._stats import Stats
from .._wire import Frame
from .outbox import Outbox
from .public import item_size, pump_public
from .transport import POLL_INTERVAL, feed, unsent_frames, watch_close

AnyFrame = bytes | Frame

__all__ = ("Pump",)

_CONFIRM_INTERVAL = 0.01
_MAX_CONFIRMING = 4
_HIGH_WATER = 4 * 1024 * 1024  # most bytes handed to nats-py and not yet on the socket
_SLICE = 1024 * 1024  # bytes written at a time


class Pump:
    """The loop side of one cluster's publishing.

    :param client: returns the attached client, or None.
    :param wake: schedules :meth:`on_wake` on the loop (any thread).
    :param fast: hand ready-made frames to nats-py's buffer (else call its ``publish``).
    :param replay: keep unconfirmed batches for replay after a lost connection.
    """

    def __init__(
        self,
        cluster: str,
        logger: logging.Logger,
        max_pending_bytes: int,
        stats: Stats,
        *,
        client: Callable[[], Client | None],
        wake: Callable[[], None],
        fast: bool,
        replay: bool,
        still_wanted: Callable[[AnyFrame], bool] = lambda frame: True,
    ) -> None:
        self.cluster = cluster
        self._still_wanted = still_wanted
        self.logger = logger
        self.stats = stats
        self.fast = fast
        self.replay = replay and fast
        self._client = client
        # Up to the high-water mark of bytes sits in nats-py's buffer and the transport;
        # writing it to the socket briefly copies it twice more. The outbox's budget leaves
        # room for that, so that the whole stays within max_pending_bytes.
        self.high_water = max(1024, min(_HIGH_WATER, max_pending_bytes // 16))
        capacity = max_pending_bytes - 2 * self.high_water
        self.outbox: Outbox[Any] = Outbox(capacity, wake, cluster, limit=max_pending_bytes, on_late=self._late)
        self.pings = Pings(fast)
        #: Bytes handed to the client and not yet given back to the budget.
        self.in_flight = 0
        self._feeder: asyncio.Task[None] | None = None
        self._public: asyncio.Task[None] | None = None
        self._confirmer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._poll_handle: asyncio.TimerHandle | None = None
        self._unconfirmed: list[list[AnyFrame]] = []
        self._unconfirmed_bytes = 0
        self._confirming: deque[Ping] = deque()
        #: The connection (see ``internals.connection_token``) the unconfirmed batches went out on.
        self._unconfirmed_token: object = None
        #: Frames to put first on the next connection: unconfirmed when a connection was
        #: lost, or kept from a client whose event loop ended.
        self._replay: deque[AnyFrame] = deque()
        #: The connection the replay may go out on (set once nats-py says it reconnected).
        self._replay_token: object = None

    # -- clients coming and going ----------------------------------------------------
    def attach(self, nc: Client) -> None:
        """Start using the newly connected client *nc*; what waits for replay (from a
        client whose event loop ended) goes first."""
        held = sum(map(len, self._replay))
        if self.in_flight > held:  # a previous client's bytes that nobody accounted for
            self._lose(self.in_flight - held, "the previous connection ended before they were confirmed")
        self.in_flight = held
        self._confirming.clear()
        self._unconfirmed, self._unconfirmed_bytes = [], 0
        token = internals.connection_token(nc) if self.fast else None
        self._unconfirmed_token = self._replay_token = token
        if self._replay and not self.fast:  # kept from a public-API client: nothing to replay with
            frames = list(self._replay)
            self._replay.clear()
            self.in_flight = 0
            self._lose(held, f"{len(frames)} messages of a client whose event loop ended could not be sent")

    def salvage(self, nc: Client | None) -> None:
        """The event loop of client *nc* has ended (its tasks are gone): keep the frames
        it never sent (with replay: never confirmed) for the next client."""
        self._feeder = self._public = self._confirmer = self._closer = None
        self._poll_handle = None
        self.pings = Pings(self.fast)
        self.outbox.scheduled = False
        kept: list[AnyFrame] = []
        stuck = 0  # bytes of ours the transport still held: never sent
        if nc is not None and self.fast:
            unconfirmed = [f for ping in self._confirming for batch in ping.batches for f in batch]
            unconfirmed += [f for batch in self._unconfirmed for f in batch]
            waiting = list(self._replay)  # never written since their connection was lost
            self._replay.clear()
            kept, stuck = unsent_frames(nc, waiting, unconfirmed, self.replay)
        self._confirming.clear()
        self._unconfirmed, self._unconfirmed_bytes = [], 0
        self._replay.extendleft(reversed(kept))
        held = sum(map(len, self._replay))
        if self.in_flight > held:
            gone = self.in_flight - held
            self.in_flight = held
            lost = gone if not self.fast else (0 if self.replay else min(gone, stuck))
            self._lose(lost, "a client whose event loop ended held unsent messages")
            self.outbox.release(gone - lost)
        self.in_flight = held

    def pending_work(self) -> bool:
        """True when messages wait to be handed to a client."""
        return bool(len(self.outbox) or self._replay)

    # -- moving messages -----------------------------------------------------------
    def on_wake(self) -> None:
        """Move what fits into the client (on the loop)."""
        nc = self._client()
        if nc is None or nc.is_closed or nc.is_draining:
            self.outbox.scheduled = False
            return
        if not nc.is_connected:
            self.outbox.scheduled = False  # reconnecting: on_reconnected resumes
            self.reconcile(nc)
            self.watch_close(nc)
            return
        if self.fast and internals.transport_closing(nc):
            # The socket is gone and nats-py has not noticed yet: write nothing more into
            # it (what it held is replayed or counted once nats-py reports the loss).
            self.outbox.scheduled = False
            return
        if not self.fast:
            if self._public is None or self._public.done():
                self._public = asyncio.get_running_loop().create_task(
                    pump_public(nc, self.outbox, self._client, self._late, self.stats, self.logger, self.cluster)
                )
            return
        # Keep nats-py's buffer and the transport's small: what does not fit waits in
        # the outbox, budgeted, instead of being copied into the transport's buffer.
        room = internals.write_room(nc, self.high_water)
        token = internals.connection_token(nc)
        if self.replay and self._unconfirmed and self._unconfirmed_token is not token:
            # Handed to a connection that nats-py abandoned without telling us (a
            # reconnection attempt that failed after its handshake): send them again.
            self._hold_for_replay()
        if self._replay:
            if self._replay_token is not token:
                self.outbox.scheduled = False  # on_reconnected starts the replay
                return
            room -= self._feed_replay(nc, room)
            if self._replay:
                room = 0  # the rest of the replay goes first
        self._unconfirmed_token = token
        while room > 0:
            # In slices: once the socket is full, the rest waits here, uncopied.
            frames, nbytes = self.outbox.take_upto(min(room, _SLICE))
            if not frames:
                break
            self.in_flight += nbytes  # counted before writing: a failed write loses nothing silently
            self.stats.add("published", len(frames))
            self.stats.add("bytes", nbytes)
            self._write(nc, frames, nbytes)
            room = internals.write_room(nc, self.high_water)
        if (len(self.outbox) or self._replay) and (self._feeder is None or self._feeder.done()):
            self._feeder = asyncio.get_running_loop().create_task(
                feed(nc, self.outbox, self._replay, self._client, self.on_wake, self.fast)
            )
        self.reconcile(nc)

    def _feed_replay(self, nc: Client, room: int) -> int:
        """Write the next slice (about *room* bytes) of the frames to send again, and
        return its size: the whole replay at once would be copied into the transport's
        buffer while replay still holds every frame."""
        if room <= 0:
            return 0
        replay = self._replay
        frames: list[AnyFrame] = []
        nbytes = 0
        while replay and nbytes < room:
            frame = replay.popleft()
            frames.append(frame)
            nbytes += len(frame)
        self.stats.add("replayed", len(frames))
        self._write(nc, frames, nbytes)
        return nbytes

    def _write(self, nc: Client, frames: list[AnyFrame], nbytes: int) -> None:
        """Write *frames*; with replay, keep them until a PONG confirms them (kept before
        the write, so that a failed write loses nothing)."""
        if self.replay:
            self._unconfirmed.append(frames)
            self._unconfirmed_bytes += nbytes
        internals.write_frames(nc, frames, nbytes)
        if self.replay:
            if self._unconfirmed_bytes >= self.high_water:
                self._request_confirmation(nc)  # don't let a fast sender wait for the tick
            self._confirm_soon(nc)

    def _confirm_soon(self, nc: Client) -> None:
        if self._confirmer is None or self._confirmer.done():
            self._confirmer = asyncio.get_running_loop().create_task(self._confirm(nc))

    def watch_close(self, nc: Client) -> None:
        """(The connection is going.) nats-py, before reconnecting, closes the transport
        and waits until it has written what it holds: into a peer that stopped reading (a
        stalled server, a half-closed link) that is for ever, and nothing reconnects.
        What a closing transport holds is replayed or counted as lost in any case: once it
        stops draining, drop it."""
        if self._closer is None or self._closer.done():
            self._closer = asyncio.get_running_loop().create_task(
                watch_close(nc, self._client, self.logger, self.cluster)
            )

    def reconcile(self, nc: Client) -> None:
        """Give back the budget of bytes that left the process (with replay: that the
        server confirmed); poll while producers wait for room."""
        if self.fast and not self.replay and not internals.transport_closing(nc):
            # (What a closing transport holds is lost: on_disconnected counts it.)
            held = internals.buffered_bytes(nc)
            if held < self.in_flight:
                self.outbox.release(self.in_flight - held)
                self.in_flight = held
        if self.outbox.waiters and self._poll_handle is None:
            self._poll_handle = asyncio.get_running_loop().call_later(POLL_INTERVAL, self._poll)

    def _poll(self) -> None:
        self._poll_handle = None
        self.on_wake()

    async def pump_to(self, mark: int, deadline: float) -> bool:
        """Hand the client everything queued before *mark* (see ``Outbox.mark``), while
        connected, by *deadline* (loop time); True once done."""
        loop = asyncio.get_running_loop()
        while self.outbox.taken < mark or self._replay:  # the replay is older than the outbox
            nc = self._client()
            if nc is None or not nc.is_connected or loop.time() >= deadline:
                return False
            self.on_wake()
            if self.outbox.taken >= mark and not self._replay:
                break
            await asyncio.sleep(POLL_INTERVAL)
        if not self.fast:  # the public path hands over one message at a time, in a task
            while self._public is not None and not self._public.done() and loop.time() < deadline:
                await asyncio.wait({self._public}, timeout=max(0.0, deadline - loop.time()))
        return True

    # -- confirmation and replay ---------------------------------------------------
    async def _confirm(self, nc: Client) -> None:
        """Every few milliseconds, confirm what was handed over since the last time."""
        while nc is self._client() and not nc.is_closed and (self._unconfirmed or self._confirming):
            await asyncio.sleep(_CONFIRM_INTERVAL)
            self._request_confirmation(nc)

    def _request_confirmation(self, nc: Client) -> None:
        """Confirm the batches handed over so far, unless enough pings are out already."""
        if self._unconfirmed and nc.is_connected and len(self._confirming) < _MAX_CONFIRMING:
            self._confirming_ping(nc)

    def _confirming_ping(self, nc: Client) -> Ping | None:
        """Send a PING after the batches handed over so far; its PONG confirms them."""
        ping = self.pings.send(nc)
        if ping is None:
            return None
        ping.batches, ping.nbytes = self._unconfirmed, self._unconfirmed_bytes
        self._unconfirmed, self._unconfirmed_bytes = [], 0
        self._confirming.append(ping)
        ping.outcome.add_done_callback(lambda _: self._on_pong(ping))
        return ping

    def _on_pong(self, ping: Ping) -> None:
        if ping not in self._confirming:
            return  # already replayed by on_disconnected
        if not ping.answered:
            # Lost with its connection: its batches wait for the next confirmation (or
            # replay); the entry goes, so that lost pings cannot block confirmation.
            self._confirming.remove(ping)
            self._unconfirmed.insert(0, [f for batch in ping.batches for f in batch])
            self._unconfirmed_bytes += ping.nbytes
            return
        released = 0
        while self._confirming:
            head = self._confirming.popleft()
            released += head.nbytes
            if head is ping:
                break
        self.in_flight -= released
        self.outbox.release(released)
        nc = self._client()
        if nc is not None and self._unconfirmed_bytes >= self.high_water:
            self._request_confirmation(nc)

    def on_disconnected(self, nc: Client) -> None:
        """The connection dropped: what the server never confirmed goes first once
        nats-py has reconnected, handed over in slices like everything else."""
        confirming, self._confirming = list(self._confirming), deque()
        self.pings.connection_lost()
        if not self.fast:
            return
        if not self.replay:
            # What the transport still held is gone with the connection (frames are
            # written to it directly; nats-py's reconnect buffer holds none of them).
            lost, self.in_flight = self.in_flight, 0
            self._lose(lost, "the connection dropped before they were written")
            return
        self._unconfirmed = [batch for ping in confirming for batch in ping.batches] + self._unconfirmed
        self._hold_for_replay()
        if self._replay:
            self.logger.warning(
                "cluster %s: %d messages not yet confirmed by the server will be sent again after reconnecting",
                self.cluster,
                len(self._replay),
            )

    def _hold_for_replay(self) -> None:
        """The unconfirmed batches went out on a connection that is gone: keep them for
        the next one, but for requests already answered (or given up)."""
        wanted = self._still_wanted
        skipped = 0
        for batch in self._unconfirmed:
            for frame in batch:
                if wanted(frame):
                    self._replay.append(frame)
                else:
                    skipped += len(frame)
        self._unconfirmed, self._unconfirmed_bytes = [], 0
        if skipped:
            self.in_flight -= skipped
            self.outbox.release(skipped)

    def on_reconnected(self, nc: Client) -> None:
        if self.replay:
            token = internals.connection_token(nc)
            for ping in list(self._confirming):
                if ping.token is not token:  # answered never: sent before this connection
                    self._confirming.remove(ping)
                    self._replay.extend(frame for batch in ping.batches for frame in batch)
            if self._unconfirmed and self._unconfirmed_token is not token:
                self._hold_for_replay()
            self._replay_token = token  # the replay goes out on this connection, in slices
        self.pings.reconnected(nc)
        self.on_wake()  # the replay first, then what waited during the outage
        if self.replay and self._unconfirmed:
            self._confirm_soon(nc)

    def lose_in_flight(self, why: str) -> None:
        """The client dropped its buffer: count and log the loss."""
        lost, self.in_flight = self.in_flight, 0
        self._unconfirmed, self._unconfirmed_bytes = [], 0
        self._replay.clear()
        self._confirming.clear()
        self.pings.connection_lost()
        self._lose(lost, why)

    def _lose(self, nbytes: int, why: str) -> None:
        """Bytes no longer counted in flight are gone: give their budget back, count
        and log them."""
        self.outbox.release(nbytes)
        if nbytes:
            self.stats.add("dropped_bytes", nbytes)
            self.logger.error("cluster %s: %s; %d buffered bytes were dropped", self.cluster, why, nbytes)

    def _late(self, items: list[Any]) -> None:
        self.report_dropped(items, "accepted while closing, or cut off by a stopping event loop")

    def report_dropped(self, items: list[Any], why: str) -> None:
        """Messages that will never reach a client: count and log them."""
        self.stats.add("dropped", len(items))
        self.stats.add("dropped_bytes", sum(map(item_size, items)))
        self.logger.error("cluster %s: %d messages dropped: %s", self.cluster, len(items), why)

    def unconfirmed_at_close(self, nc: Client) -> None:
        """Closing without a drain: count what the server may not have received."""
        if self.replay:
            frames = [f for ping in self._confirming for batch in ping.batches for f in batch]
            frames += [f for batch in self._unconfirmed for f in batch]
            frames = list(self._replay) + frames
            self._replay.clear()
            self._confirming.clear()
            self._unconfirmed, self._unconfirmed_bytes = [], 0
            if frames:
                self.report_dropped(frames, "the server did not confirm them before the connection was closed")
            return
        unsent = internals.buffered_bytes(nc)
        if unsent:
            self.stats.add("dropped_bytes", unsent)
            self.logger.error("cluster %s: close could not deliver %d buffered bytes", self.cluster, unsent)

    # -- pings ---------------------------------------------------------------------
    async def ping(self, nc: Client, timeout: float) -> bool | None:
        """One PING/PONG round trip after what was handed over so far: True when
        answered, False when its connection was lost, None after *timeout* s."""
        ping = self._confirming_ping(nc) if self.replay and self._unconfirmed else None
        if ping is None:
            ping = self.pings.send(nc)
        if ping is None:
            return False
        done, _ = await asyncio.wait({ping.outcome}, timeout=max(0.0, timeout))
        if not done:
            return None
        return ping.answered

    def shutdown(self) -> list[Any]:
        """Stop the background work; return the messages never handed to the client."""
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        for task in (self._feeder, self._confirmer, self._closer):
            if task is not None:
                task.cancel()
        self.pings.close()
        self.in_flight = 0
        self._unconfirmed, self._unconfirmed_bytes = [], 0
        self._confirming.clear()
        left: list[Any] = list(self._replay) + self.outbox.seal()
        self._replay.clear()
        return left
