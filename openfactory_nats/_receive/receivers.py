"""The loop side of subscriptions: nats-py subscriptions feeding thread-side inboxes.

Each subscription of a cluster has a :class:`Receiver` on the event loop. It owns the
nats-py subscription of the current client and collects what nats-py delivers during
one pass of the event loop into one batch, handed to its *sink* (the thread-side
:class:`~openfactory_nats._receive.inbox.Inbox`, or an asyncio queue) with a single call: one
wake-up of the consumer per batch, as the publish path does in the other direction.
On the fast path nats-py's parser hands each message straight to its receiver
(``_natsio.internals.route_messages``), without building a nats-py message on the way.

nats-py re-sends its subscriptions after a reconnection by itself; when the cluster's
client is replaced (nats-py gave up, or the event loop ended), :class:`Receivers`
subscribes everything again on the new one. Core NATS is at-most-once: what the server
routed while no connection was up is not received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg as NatsMsg

from .._errors import ClusterUnavailableError
from .._forksafe import renew_after_fork
from .._message import Msg, Responder
from .._natsio import internals
from .._natsio.client import refuses_subscription
from .._stats import Tally

__all__ = ("MALFORMED_REPORT_INTERVAL", "Receiver", "Receivers", "Sink")

#: Seconds between two reports of messages dropped because they could not be read.
MALFORMED_REPORT_INTERVAL = 5.0

_RECONNECT_POLL = 0.02


class Sink(Protocol):
    """Where a receiver hands its batches (never blocks)."""

    def count_into(self, tally: Tally) -> None:
        """Add what is dropped, discarded or raised from now on to *tally* too."""

    def offer(self, batch: list[Msg]) -> None: ...

    def close(self, drain: bool = False, timeout: float = 5.0) -> bool: ...


class Receiver:
    """One subscription on the event loop.

    :param subject: the subject filter (validated).
    :param queue: the queue group, or None.
    :param sink: receives the batches.
    :param responder: what :meth:`Msg.respond` of the messages calls.
    :param direct: takes each message as nats-py reads it, instead of the sink taking
        them in batches (the reply inbox: its callers wait for nothing else).
    """

    def __init__(
        self,
        subject: str,
        queue: str | None,
        sink: Sink,
        responder: Responder | None,
        *,
        internal: bool = False,
        direct: internals.Deliver | None = None,
    ) -> None:
        self.subject = subject
        #: The library's own (the reply inbox): not counted as a user's subscription.
        self.internal = internal
        self.queue = queue
        self.sink = sink
        self.responder = responder
        self._direct = direct
        #: Where its messages are counted (its cluster's), once registered.
        self.tally: Tally | None = None
        #: The server's refusal of this subscription, while it is being confirmed.
        self.refusal: BaseException | None = None
        self._sub: Any = None
        self._nc: Client | None = None
        self._fast = False
        self._batch: list[Msg] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- what nats-py calls -------------------------------------------------------------
    def deliver(self, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None) -> None:
        """A message as nats-py's parser reads it (see ``internals.route_messages``)."""
        msg = Msg(subject.decode(), data, headers, reply.decode() if reply else None, responder=self.responder)
        self._batch.append(msg)
        if not self._scheduled:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self.hand_over)

    def put_nowait(self, msg: NatsMsg) -> None:
        """A nats-py message (the subscription's pending queue, or its callback)."""
        self._batch.append(Msg(msg.subject, msg.data, msg.headers, msg.reply or None, responder=self.responder))
        if not self._scheduled:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self.hand_over)

    def qsize(self) -> int:
        return len(self._batch)

    def empty(self) -> bool:
        return not self._batch

    def task_done(self) -> None:
        pass

    async def join(self) -> None:  # nats-py's drain waits for the queue to empty
        self.hand_over()

    async def _on_msg(self, msg: NatsMsg) -> None:  # the public-API path: one call per message
        self.put_nowait(msg)

    # -- batches --------------------------------------------------------------------
    def hand_over(self) -> None:
        """Hand what was collected to the sink, as one batch."""
        self._scheduled = False
        batch, self._batch = self._batch, []
        if not batch:
            return
        tally = self.tally
        if tally is not None:
            tally.add(received=len(batch))
        self.sink.offer(batch)

    # -- the nats-py subscription ------------------------------------------------------
    async def attach(self, nc: Client, fast: bool) -> None:
        """Subscribe on client *nc* (limits are ours: nats-py's are switched off)."""
        self._loop = asyncio.get_running_loop()
        self._nc, self._fast = nc, fast
        if self._scheduled:  # a hand-over scheduled on an event loop that ended never ran
            self.hand_over()
        if fast:
            sub = await nc.subscribe(self.subject, queue=self.queue or "", pending_msgs_limit=0, pending_bytes_limit=0)
            internals.divert_pending(sub, self)
            internals.route_messages(nc, sub._id, self._direct or self.deliver)
        else:
            sub = await nc.subscribe(
                self.subject, queue=self.queue or "", cb=self._on_msg, pending_msgs_limit=0, pending_bytes_limit=0
            )
        self._sub = sub

    @property
    def connected(self) -> bool:
        """False while the client this receiver is subscribed on is not connected (it
        is reconnecting, or was replaced by one not connected yet)."""
        nc = self._nc
        return nc is None or nc.is_connected

    def forget(self) -> None:
        """The client this receiver was subscribed on is gone."""
        self._sub = None

    async def detach(self, drain: bool, timeout: float) -> bool:
        """Stop receiving; with *drain*, first receive what the server already sent
        (within *timeout* s). True unless the drain ran out of time."""
        sub, self._sub = self._sub, None
        done = True
        if sub is not None:
            try:
                with contextlib.suppress(nats.errors.Error, OSError):
                    if drain and self._fast:
                        assert self._nc is not None
                        done = await internals.drain_subscription(self._nc, sub, timeout)
                    else:
                        await sub.unsubscribe()
            finally:
                if self._fast and self._nc is not None:
                    internals.route_messages(self._nc, sub._id, None)
        self.hand_over()
        return done


class Receivers:
    """The receivers of one cluster, re-subscribed on every new client.

    The counts of :meth:`counts` live in one place, the cluster's :class:`Tally`: each
    receiver adds what it receives, each sink what it drops, discards or sees raised, as
    it happens. So they are exact and never decrease, and nothing is kept of a
    subscription once it is gone.
    """

    def __init__(self, cluster: str, logger: logging.Logger, fast: bool) -> None:
        self.cluster = cluster
        self.logger = logger
        self.fast = fast
        self._all: set[Receiver] = set()
        self._lock = threading.Lock()  # short: membership
        self.tally = Tally()
        #: Receivers whose SUB is out and not yet confirmed (see :meth:`refused`).
        self._confirming: set[Receiver] = set()
        #: Messages dropped because they could not be read (see ``on_malformed``).
        self.malformed = 0
        self._malformed_reported = 0
        self._malformed_next_report = 0.0
        renew_after_fork(self)

    def _renew_after_fork(self) -> None:
        self._lock = threading.Lock()  # a parent thread reading counts() may have held it

    def any(self) -> bool:
        """True while any receiver (the reply inbox included) is registered."""
        return bool(self._all)

    def __len__(self) -> int:
        """The users' subscriptions (the reply inbox is not one)."""
        return sum(1 for receiver in list(self._all) if not receiver.internal)

    def register(self, receiver: Receiver) -> None:
        """Count *receiver* in: it is subscribed on every client from now on."""
        if not receiver.internal and receiver.tally is None:
            receiver.tally = self.tally
            receiver.sink.count_into(self.tally)
        with self._lock:
            self._all.add(receiver)

    def confirming(self, receiver: Receiver) -> None:
        """*receiver*'s SUB goes out now: a refusal naming it is kept for it until
        :meth:`confirmed`."""
        receiver.refusal = None
        self._confirming.add(receiver)

    def confirmed(self, receiver: Receiver) -> BaseException | None:
        """The server answered after *receiver*'s SUB: its refusal, if it was refused."""
        self._confirming.discard(receiver)
        return receiver.refusal

    def refused(self, nc: Client, exc: BaseException) -> None:
        """nats-py reported *exc* on client *nc*: when it is the server's refusal of a
        subscription, it belongs to the receiver(s) it names, not to whichever waits."""
        for receiver in self._confirming:
            if receiver._nc is nc and refuses_subscription(exc, receiver.subject, receiver.queue):
                receiver.refusal = exc

    def sinks(self, internal: bool = True) -> list[Sink]:
        """The sinks of the receivers registered now (any thread); without *internal*,
        the users' only."""
        return [receiver.sink for receiver in list(self._all) if internal or not receiver.internal]

    async def remove(self, receiver: Receiver, drain: bool, timeout: float = 5.0) -> bool:
        """Unsubscribe *receiver* (see :meth:`Receiver.detach`) and forget it.

        With *drain* during a reconnection, the reconnection is waited for within
        *timeout* s first: nats-py cannot drain while reconnecting.

        :raises ClusterUnavailableError: when *drain* was asked and the connection was
            not back within *timeout* s (the subscription is removed all the same).
        """
        if receiver not in self._all:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            # nats-py offers no event for the end of a reconnection, hence the polling.
            while drain and not receiver.connected and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(_RECONNECT_POLL)
                if receiver not in self._all:
                    return True  # the cluster closed meanwhile: its close ended the subscription
            connected = not drain or receiver.connected
            done = await receiver.detach(drain and connected, max(0.0, deadline - loop.time()))
        finally:
            self._retire(receiver)
        if not connected:
            raise ClusterUnavailableError(
                f"cluster {self.cluster!r}: subscription {receiver.subject!r} not drained: the connection was "
                f"lost and not back within {timeout:g} s (what the server had sent meanwhile is not received)",
                cluster=self.cluster,
            )
        return done

    async def attach_all(self, nc: Client) -> None:
        """A new client: subscribe everything on it."""
        for receiver in list(self._all):
            receiver.forget()
            try:
                await receiver.attach(nc, self.fast)
            except (nats.errors.Error, OSError) as exc:
                self.logger.error(
                    "cluster %s: could not subscribe to %s again on the new connection: %s",
                    self.cluster,
                    receiver.subject,
                    exc,
                )

    def on_malformed(self, subject: bytes, exc: Exception) -> None:
        """(The loop) A message that could not be read (``_natsio.guard_messages``): it
        is dropped and counted, and reported at WARNING at most once every
        :data:`MALFORMED_REPORT_INTERVAL` seconds; the connection goes on."""
        self.malformed += 1
        now = time.monotonic()
        if now < self._malformed_next_report:
            return
        self._malformed_next_report = now + MALFORMED_REPORT_INTERVAL
        count, self._malformed_reported = self.malformed - self._malformed_reported, self.malformed
        self.logger.warning(
            "cluster %s: %d message(s) dropped since the last report because they could not be read "
            "(%d in all), e.g. on subject %r: %s",
            self.cluster,
            count,
            self.malformed,
            subject[:100],
            exc,
        )

    def hand_over_all(self) -> None:
        for receiver in list(self._all):
            receiver.hand_over()

    def end_all(self, end: Callable[[Receiver], object]) -> None:
        """Closing: forget every receiver, calling *end* for each."""
        for receiver in list(self._all):
            receiver.hand_over()
            self._retire(receiver)
            end(receiver)

    def _retire(self, receiver: Receiver) -> None:
        """(The loop) *receiver* leaves (its counts stay in the tally)."""
        with self._lock:
            self._all.discard(receiver)

    def counts(self) -> tuple[int, int, int, int]:
        """Messages received, dropped by slow consumers, callback errors and messages
        discarded by closed subscriptions, since construction (any thread). Each never
        decreases from one call to the next."""
        return self.tally.values()
