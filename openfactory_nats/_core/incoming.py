"""The receive side of :class:`~openfactory_nats.NatsCluster`: subscriptions and
request/reply, kept apart from the connection's life cycle and the publishing path.

:class:`Incoming` is one object per core. It keeps the core's receivers (its
subscriptions, :class:`~openfactory_nats._receive.receivers.Receivers`, which the core's
connection attaches to each new client) and owns its reply inbox; what it needs of the
core (the life cycle, the pump, the counters, connecting, queueing a message) is handed
to it when it is made, and nothing else is read.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Final

import nats.errors
from nats.aio.client import Client

from .._errors import (
    BufferFullError,
    ClusterClosedError,
    ClusterTimeoutError,
    ClusterUnavailableError,
    NatsClusterError,
    RefusedError,
)
from .._filters import check_sub_line, validate_filter, validate_queue
from .._message import Msg
from .._natsio.client import describe, is_limit_refusal
from .._receive.inbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_MSGS
from .._receive.receivers import Receiver, Receivers, Sink
from .._receive.replies import Replies, Waiter, build_request_frame, check_reply
from .._receive.subscription import AsyncCallback, AsyncSubscription
from .._send.pump import Pump
from .._stats import Stats
from .._wire import (
    Frame,
    build_frame,
    check_timeout,
    encode_headers,
    frame_head,
    payload_bytes,
    subject_bytes,
    wire_subject,
)
from .lifecycle import Lifecycle, Phase

__all__ = ("CONNECT", "REPLIES", "REPLY", "Incoming", "RequestLife", "RequestStep")

_OPEN = Phase.OPEN

#: What a request's life (:meth:`Incoming.request_life`) waits for, each with a timeout:
#: the reply inbox to be subscribed, a connection, or the reply of ``(REPLY, t, waiter)``.
REPLIES: Final = "replies"
CONNECT: Final = "connect"
REPLY: Final = "reply"
RequestStep = tuple[str, float, Waiter | None]
RequestLife = Generator[RequestStep, object, Msg]


class Incoming:
    """Subscribing and requesting, for one :class:`~openfactory_nats.NatsCluster`.

    :param connect: connect within the given seconds (the core's ``_connect``).
    :param attached: the client messages go to now, or None.
    :param adopt_loop: bind the core to the running event loop.
    :param on_loop: True on the core's event-loop thread.
    :param lost_error: the error for an operation (named) that found no client.
    :param offer: queue a message, as ``NatsCluster.offer``.
    :param prepare: validate a message, as ``NatsCluster.prepare``.
    :param max_payload: the server's limit on a message's payload and headers, now.
    """

    def __init__(
        self,
        name: str,
        logger: logging.Logger,
        life: Lifecycle,
        pump: Pump,
        stats: Stats,
        receivers: Receivers,
        *,
        fast: bool,
        connect_timeout: float,
        connect: Callable[[float], Awaitable[None]],
        attached: Callable[[], Client | None],
        adopt_loop: Callable[[], None],
        on_loop: Callable[[], bool],
        lost_error: Callable[[str], ClusterUnavailableError],
        offer: Callable[[object, object, object, float], bool],
        prepare: Callable[[object, object, object], int],
        max_payload: Callable[[], int],
    ) -> None:
        self.name = name
        self.logger = logger
        self.connect_timeout = connect_timeout
        self._life = life
        self._pump = pump
        self._stats = stats
        self._fast = fast
        self._connect = connect
        self._attached = attached
        self._adopt_loop = adopt_loop
        self._on_loop = on_loop
        self._lost_error = lost_error
        self._offer = offer
        self._prepare = prepare
        self._max_payload = max_payload
        #: The subscriptions of the core, the reply inbox's included.
        self.receivers = receivers
        self._replies: Replies | None = None
        self._replies_task: asyncio.Task[None] | None = None
        self._replies_ready: Replies | None = None

    @property
    def late_replies(self) -> int:
        """Replies that came after their requester had given up (dropped)."""
        return self._replies.late if self._replies is not None else 0

    def add_counts(self, result: dict[str, int]) -> None:
        """Add the receive side's counters and gauges to *result* (``NatsCluster.stats``)."""
        received, dropped, errors, discarded = self.receivers.counts()
        result["received"] = received
        result["receive_dropped"] = dropped
        result["receive_malformed"] = self.receivers.malformed
        result["callback_errors"] = errors
        result["discarded"] = discarded
        result["subscriptions"] = len(self.receivers)
        result["late_replies"] = self.late_replies

    def fail_requests(self, error: NatsClusterError, *, for_good: bool) -> None:
        """End the requests waiting for a reply with *error*: those waiting now (their
        connection is gone), or, *for_good*, also every later one (closing)."""
        if self._replies is not None:
            if for_good:
                self._replies.fail_all(error)
            else:
                self._replies.fail_waiting(error)

    def still_wanted(self, frame: bytes | Frame) -> bool:
        """Whether a frame lost with its connection is worth sending again: not a request
        whose reply came already, or whose caller gave up."""
        replies = self._replies
        head = frame_head(frame)
        if replies is None or not head.startswith((b"PUB ", b"HPUB ")):
            return True
        line = head[: head.find(b"\r\n")].split(b" ")
        reply = line[2] if len(line) == (4 if line[0] == b"PUB" else 5) else b""
        return replies.waiting(reply)

    # -- requests ------------------------------------------------------------------
    def replies(self) -> Replies | None:
        """The reply inbox, once subscribed (any thread)."""
        return self._replies_ready

    def _replies_subscribed(self, replies: Replies, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._replies_ready = replies

    async def ensure_replies(self, timeout: float) -> Replies:
        """Subscribe the reply inbox (once), within *timeout* s."""
        self._life.check_open()
        self._adopt_loop()
        task = self._replies_task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            replies = self._replies = Replies(self.name)
            replies.on_relay_end = self._pump.outbox.kick
            receiver = Receiver(replies.subject, None, replies, None, internal=True, direct=replies.deliver)
            # Shared by every first request: bounded on its own, not by the first caller's timeout.
            bound = max(timeout, self.connect_timeout)
            task = self._replies_task = asyncio.get_running_loop().create_task(self.add_receiver(receiver, bound))
            task.add_done_callback(functools.partial(self._replies_subscribed, replies))
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            raise ClusterTimeoutError(
                f"cluster {self.name!r}: could not subscribe the reply inbox within {timeout:g} s", cluster=self.name
            )
        task.result()
        assert self._replies is not None
        return self._replies

    def offer_request(
        self, subject: object, reply: bytes, payload: object, headers: object, timeout: float, *, counted: bool = True
    ) -> bool:
        """Queue a request frame (any thread), as :meth:`offer` does a message; *counted*
        in ``requests`` (a JetStream pull request is not)."""
        if self._life.phase is not _OPEN:
            self._life.check_open()
            return False
        subj = subject_bytes(subject)  # validated (and cached)
        data = payload_bytes(payload)
        block = encode_headers(headers) if headers is not None else None
        limit = self._max_payload()
        if len(data) + (len(block) if block is not None else 0) > limit:
            build_frame(subject, data, headers, limit)  # raises the size error
        frame = build_request_frame(subj, reply, data, block)
        item: object = frame
        if not self._fast:  # the public API publishes (subject, payload, headers, size, reply)
            copied = dict(headers) if isinstance(headers, Mapping) else None
            item = (subject, data, copied, len(frame), reply.decode())
        try:
            outbox = self._pump.outbox
            outbox.put(item, len(frame), timeout, wake=False)
            # While answered requesters are being woken, what they send waits for the last
            # of them to leave in one write (see Replies: the relay's end kicks the outbox).
            # Looked at after queueing: a relay ending meanwhile has seen the frame.
            replies = self._replies
            if replies is None or not replies.relaying():
                outbox.kick()
        except BufferFullError:
            self._stats.add("refused")
            raise
        if counted:
            self._stats.add("requests")
        return True

    def request_life(
        self,
        subject: str,
        payload: object,
        headers: Mapping[str, str] | None,
        wait: float,
        clock: Callable[[], float],
        future: Callable[[], asyncio.Future[None]] | None = None,
    ) -> RequestLife:
        """One request, from validation to its reply, the same for the blocking and the
        asyncio API: a generator that yields what it waits for (a :data:`RequestStep`:
        :data:`REPLIES`, :data:`CONNECT` or :data:`REPLY`, with the time left on *clock*)
        and returns the reply. Its driver waits as its caller can (a blocked thread, or
        an awaiting task) and sends back the outcome; closing the generator (the driver
        gave up) forgets the waiting caller. With *future* (asyncio), the reply completes
        a future made by it, and queueing never waits for room in the buffer.

        :raises: as :meth:`request`.
        """
        deadline = clock() + wait
        replies = self._replies_ready
        if replies is None:  # the first request: bad input raises before connecting
            self._life.check_open()
            self._prepare(subject, payload, headers)
            got = yield REPLIES, wait, None
            assert isinstance(got, Replies)
            replies = got
        waiter = replies.expect(None if future is None else future())
        try:
            room = future is None  # a thread may wait for room in the buffer; the loop may not
            while not self.offer_request(
                subject, waiter.reply, payload, headers, max(0.0, deadline - clock()) if room else 0.0
            ):
                self._prepare(subject, payload, headers)  # no client: bad input raises before connecting
                yield CONNECT, max(0.0, deadline - clock()), None
            yield REPLY, deadline - clock(), waiter
        finally:
            replies.forget(waiter)
        return self.request_outcome(subject, waiter, wait)

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 10.0,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Msg:
        """Send a request and return the reply: :meth:`NatsCluster.request <openfactory_nats.NatsCluster.request>`."""
        self._life.check_open()
        wait = check_timeout(timeout)
        loop = asyncio.get_running_loop()
        life = self.request_life(subject, payload, headers, wait, loop.time, loop.create_future)
        try:
            step, left, waiter = next(life)
            while True:
                if waiter is not None:
                    await asyncio.wait({waiter.future}, timeout=max(0.0, left))
                    step, left, waiter = life.send(None)
                elif step == CONNECT:
                    await self._connect(left)
                    step, left, waiter = life.send(None)
                else:
                    step, left, waiter = life.send(await self.ensure_replies(left))
        except StopIteration as end:
            reply: Msg = end.value
            return reply
        finally:
            life.close()

    def request_outcome(self, subject: str, waiter: Waiter, wait: float) -> Msg:
        """The reply *waiter* got, or the error it stands for (any thread)."""
        if waiter.error is not None:
            raise waiter.error
        if waiter.msg is None:  # a reply that came just after the wait ended still counts
            raise ClusterTimeoutError(
                f"cluster {self.name!r}: no reply to {subject!r} within {wait:g} s", cluster=self.name
            )
        return check_reply(self.name, subject, waiter.msg)

    # -- subscribing ---------------------------------------------------------------
    async def subscribe(
        self,
        subject: str,
        callback: AsyncCallback | None = None,
        *,
        queue: str | None = None,
        max_pending_msgs: int = DEFAULT_MAX_MSGS,
        max_pending_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float = 10.0,
    ) -> AsyncSubscription:
        """Subscribe to *subject*: :meth:`NatsCluster.subscribe <openfactory_nats.NatsCluster.subscribe>`."""
        filt = validate_filter(subject)
        group = validate_queue(queue)
        check_sub_line(filt, group)
        wait = check_timeout(timeout)
        sink = AsyncSubscription(self, filt, callback, max_pending_msgs, max_pending_bytes)
        receiver = Receiver(filt, group, sink, self.respond)
        sink.receiver = receiver
        await self.add_receiver(receiver, wait)
        return sink

    def respond(self, reply: str, data: bytes, headers: Mapping[str, str] | None) -> None:
        """Queue a reply, from any thread: :meth:`NatsCluster.respond <openfactory_nats.NatsCluster.respond>`."""
        if not self._offer(wire_subject(reply), data, headers, 0.0 if self._on_loop() else self.connect_timeout):
            raise self._lost_error("respond")

    async def add_receiver(self, receiver: Receiver, timeout: float) -> None:
        """Subscribe *receiver* (connecting first if need be) and return once the server
        has registered the interest, within *timeout* s.

        :raises ClusterClosedError: after :meth:`close` (also when it starts meanwhile).
        """
        self._life.check_open()
        self._adopt_loop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not self._life.accepting:
            await self._connect(min(self.connect_timeout, timeout))
        self.receivers.register(receiver)
        try:
            self._life.check_open()
            nc = self._attached()
            if nc is None:
                raise self._lost_error("subscribe")
            last = nc.last_error
            # The server reports a refused SUB before the PONG: permissions through
            # error_cb, naming the subject and queue (matched to this receiver by
            # Receivers.refused: a concurrent subscription's refusal is not this one's);
            # limits only in last_error, naming nothing (nats-py then closes its client,
            # so no subscription in flight on it is made).
            self.receivers.confirming(receiver)
            try:
                try:
                    await receiver.attach(nc, self._fast)
                except (nats.errors.Error, OSError) as exc:
                    raise self._subscribe_error(receiver, exc) from exc
                answered = await self._pump.ping(nc, deadline - loop.time())
            finally:
                refusal = self.receivers.confirmed(receiver)
            # A limit refusal names nothing: it counts when it came during this wait, or
            # before it on this client, which nats-py then closed before confirming.
            limit = nc.last_error
            if refusal is None and limit is not None and (limit is not last or not answered):
                refusal = limit if is_limit_refusal(limit) else None
            if refusal is not None:
                raise RefusedError(
                    f"cluster {self.name!r}: the server refused the subscription to {receiver.subject!r}: "
                    f"{describe(refusal)}",
                    cluster=self.name,
                ) from refusal
            if not answered and loop.time() >= deadline:
                raise ClusterTimeoutError(
                    f"cluster {self.name!r}: the server did not confirm the subscription to "
                    f"{receiver.subject!r} within {timeout:g} s",
                    cluster=self.name,
                )
        except BaseException:
            await self.receivers.remove(receiver, drain=False)
            raise

    def _subscribe_error(self, receiver: Receiver, exc: BaseException) -> ClusterUnavailableError:
        """What an error of nats-py while subscribing *receiver* means for the caller
        (decided here only). nats-py raises ``ConnectionClosedError`` when it closed its
        client before the cluster heard of it (a refused SUB of another thread closes it),
        ``ConnectionDrainingError`` when close() drains it."""
        if self._life.closing:
            return ClusterClosedError(f"cluster {self.name!r} is closed", cluster=self.name)
        return ClusterUnavailableError(
            f"cluster {self.name!r}: could not subscribe to {receiver.subject!r}: the connection was lost "
            f"({describe(exc)})",
            cluster=self.name,
        )

    async def remove_receiver(self, receiver: Receiver, drain: bool, timeout: float = 5.0) -> bool:
        """Unsubscribe *receiver*; with *drain*, first receive what the server sent
        (within *timeout* s, waiting for a reconnection first). False when the drain ran
        out of time.

        :raises ClusterUnavailableError: when *drain* was asked and the connection was
            lost and not back within *timeout* s (the receiver is removed all the same).
        """
        return await self.receivers.remove(receiver, drain, timeout)

    def sinks(self, internal: bool = True) -> list[Sink]:
        """Where the subscriptions of this cluster deliver (any thread); without
        *internal*, the users' subscriptions only (not the reply inbox)."""
        return self.receivers.sinks(internal)
