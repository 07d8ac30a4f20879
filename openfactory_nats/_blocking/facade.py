"""A thread-safe, blocking facade over :class:`NatsCluster`.

The facade keeps no life-cycle state of its own: it asks the core. What it does own is
the loop thread the core runs on (its blocking calls go through a :mod:`.portal`) and,
in a forked child, the knowledge that both still belong to the parent (``_forked``)
until the child first uses the instance (see :mod:`.forking`).

An instance that is garbage-collected, or still open at interpreter exit, closes
itself through a ``weakref.finalize`` hook: it drains what it holds (bounded), counts and
logs at ERROR what it could not deliver, and stops its loop thread; collected on an event
loop's thread, it hands that work to a thread of its own rather than hold up the loop.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

from .. import _tracing
from .._core.cluster import NatsCluster
from .._core.lifecycle import ClusterState
from .._errors import ClusterTimeoutError, WrongThreadError
from .._jetstream.handle import JetStream
from .._message import Msg
from .._receive.discovery import ServiceInstance, discover
from .._receive.dispatcher import Dispatcher
from .._receive.inbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_MSGS
from .._receive.receivers import Receiver
from .._receive.service import DEFAULT_QUEUE_GROUP, Service
from .._receive.serving import Handler, Workers, check_workers
from .._receive.subscription import Subscription, open_subscription
from .._send.acked import PubAck, check_msg_id
from .._wire import check_timeout
from . import forking
from .closing import Holdings, shut_down
from .loop import LoopThread, SharedLoop
from .portal import Portal, refuse_loop_thread

__all__ = ("SyncNatsCluster",)

_AT_EXIT_TIMEOUT = 5.0


class SyncNatsCluster:
    """Publish to one NATS cluster from ordinary blocking code, from any thread.

    The :class:`NatsCluster` core runs on a dedicated daemon thread's event loop. Every
    blocking call takes a ``timeout`` (``None`` means the instance's default) and raises
    a ``TimeoutError`` subclass when it runs out.

    :param timeout: the default timeout, in seconds, of every blocking call.
    :param options: as for :class:`NatsCluster` (``connect_timeout``, ``drain_timeout``,
        ``max_pending_bytes`` and nats-py connect options).
    """

    def __init__(
        self,
        name: str,
        servers: Sequence[str] | str,
        logger: logging.Logger,
        reconnect_time_wait: float = 2,
        *,
        timeout: float = 10.0,
        _shared_loop: SharedLoop | None = None,
        **options: Any,
    ) -> None:
        self._timeout = check_timeout(timeout)
        self._args: tuple[Any, ...] = (name, servers, logger, reconnect_time_wait)
        self._options = dict(options)
        self._core = NatsCluster(*self._args, **self._options)
        self._shared_loop = _shared_loop
        self._forked = False
        self._fork_lock = threading.Lock()
        self._dispatchers: list[Dispatcher] = []
        self._workers: list[threading.Thread] = []
        self._start()
        forking.track(self)

    def _start(self) -> None:
        """Run the core on a loop thread of this process, closed when the instance is
        collected or the interpreter exits."""
        self._runner = (
            self._shared_loop.current()
            if self._shared_loop is not None
            else LoopThread(f"openfactory-nats-{self._args[0]}")
        )
        self._loop_ident = self._runner.thread.ident
        self._portal = Portal(self._runner, self._core)
        # The lists are the instance's own (kept across a fork's renewal); the rest is
        # this core's.
        self._holdings = Holdings(self._core, self._dispatchers, self._workers)
        self._finalizer = weakref.finalize(
            self,
            shut_down,
            [self._holdings],
            self._runner,
            min(self._timeout, _AT_EXIT_TIMEOUT),
            owns_loop=self._shared_loop is None,
            collected=True,
        )

    def __repr__(self) -> str:
        return f"<SyncNatsCluster {self._core!r}>"

    def __enter__(self) -> SyncNatsCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- properties ----------------------------------------------------------------
    @property
    def name(self) -> str:
        """The logical cluster name."""
        return self._core.name

    @property
    def cluster(self) -> NatsCluster:
        """The asyncio core of this process (use it only on :attr:`loop`)."""
        if self._forked:
            self._renew_after_fork()
        return self._core

    @property
    def loop(self) -> Any:
        """The background event loop the core runs on."""
        return self._runner.loop

    @property
    def state(self) -> ClusterState:
        """The current :class:`ClusterState`."""
        return ClusterState.NEW if self._forked else self._core.state

    @property
    def is_connected(self) -> bool:
        """True while connected to a server and open."""
        return self.state is ClusterState.CONNECTED

    def stats(self) -> dict[str, int]:
        """The core's counters (see :meth:`NatsCluster.stats`)."""
        return self._core.stats()

    # -- blocking calls ------------------------------------------------------------
    def connect(self, timeout: float | None = None) -> None:
        """Connect now rather than on the first publish.

        :raises ConnectError: when the cluster could not be reached (a ``RuntimeError``).
        :raises ConnectTimeoutError: when *timeout* ran out first.
        """
        wait = self._wait(timeout)
        core = self._enter()
        self._portal.call(core.connect(), wait, connecting=True)

    @overload
    def publish(
        self,
        subject: str,
        payload: bytes,
        timeout: float | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        ack: Literal[False] = False,
        msg_id: str | None = None,
    ) -> None: ...

    @overload
    def publish(
        self,
        subject: str,
        payload: bytes,
        timeout: float | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        ack: Literal[True],
        msg_id: str | None = None,
    ) -> PubAck: ...

    def publish(
        self,
        subject: str,
        payload: bytes,
        timeout: float | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        ack: bool = False,
        msg_id: str | None = None,
    ) -> PubAck | None:
        """Validate *payload* and queue it for *subject*.

        When this returns the message is queued for the server, as with awaiting
        nats-py's ``publish``; messages from one thread keep their order.

        With ``ack=True`` it blocks until the JetStream stream bound to *subject* has
        stored the message, and returns the :class:`PubAck`. The message carries *msg_id*
        (generated when None) as ``Nats-Msg-Id`` and is retried with it until *timeout*,
        so the stream stores it once even across timeouts and reconnections.

        :raises InvalidTypeError: for a non-str subject, a payload that is not bytes-like
            or headers that are not a mapping of str to str (a ``TypeError``).
        :raises InvalidMessageError: for an invalid subject, headers or timeout, or a
            payload over the server's ``max_payload`` (a ``ValueError``).
        :raises ConnectError: when the cluster cannot be reached (a ``RuntimeError``).
        :raises BufferFullError: when the outgoing buffer stayed full for *timeout* s.
        :raises ClusterTimeoutError: with ``ack``, when no acknowledgement came in time.
        :raises ClusterClosedError: after :meth:`close`.
        :raises WrongThreadError: on the event-loop thread.
        """
        if (hook := _tracing.HOOK) is not None:  # read once: uninstrument() may clear it
            if type(headers) is not _tracing.Traced:
                return hook.publish(self.publish, self._core, subject, payload, timeout, headers, ack, msg_id)
            headers = headers or None
        if ack:
            return self._publish_acked(subject, payload, timeout, headers, msg_id)
        if self._forked:
            self._renew_after_fork()
        if threading.get_ident() == self._loop_ident and self._runner.in_loop_thread():  # ids are reused
            raise WrongThreadError("This method cannot be called from the event loop thread", cluster=self.name)
        wait = self._timeout if timeout is None else check_timeout(timeout)
        if not self._core.outgoing.offer(subject, payload, headers, wait):
            self._enter()  # no client is open yet: connect, then queue, within *wait*
            self._portal.connect_and_offer(subject, payload, headers, wait)
        return None

    def _publish_acked(
        self, subject: str, payload: bytes, timeout: float | None, headers: Mapping[str, str] | None, msg_id: str | None
    ) -> PubAck:
        wait = self._wait(timeout)
        core = self._enter()
        core.prepare(subject, payload, headers)  # bad input raises here, in the caller
        if msg_id is not None:
            check_msg_id(msg_id)
        coro = core.outgoing.publish_acked(subject, payload, headers, msg_id, wait)  # traced (or not) already
        return self._portal.call(coro, wait + 1.0)

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything queued before this call has reached the server
        (PING/PONG).

        :raises ClusterTimeoutError: when that did not happen within *timeout* s.
        :raises ClusterUnavailableError: when the client gave up reconnecting meanwhile.
        :raises ClusterClosedError: after :meth:`close` (also when it starts meanwhile).
        """
        wait = self._wait(timeout)
        core = self._enter()
        # The core keeps the deadline itself; the margin lets its clearer error through.
        self._portal.call(core.flush(wait), wait + 1.0)

    def close(self, timeout: float | None = None) -> None:
        """Drain (within *timeout* and ``drain_timeout``), close, stop the loop and join
        its thread. What could not be delivered in time is counted as dropped and logged.

        Idempotent and safe from many threads at once (each call returns once the instance
        is closed); every other call raises :class:`ClusterClosedError` afterwards.

        :raises WrongThreadError: on the event-loop thread.
        :raises ClusterTimeoutError: when another ``close()``, still running, did not
            finish within *timeout* s plus a margin (4 s); it goes on closing.
        """
        wait = self._wait(timeout)
        if self._runner.in_loop_thread():
            raise WrongThreadError("This method cannot be called from the event loop thread", cluster=self.name)
        if self._forked:
            self._renew_after_fork()
        if not shut_down([self._holdings], self._runner, wait, owns_loop=self._shared_loop is None):
            raise ClusterTimeoutError(
                f"cluster {self.name!r}: another close() did not finish within {wait:g} s", cluster=self.name
            )
        self._finalizer.detach()  # else its arguments keep the core, and what refers to us from it, for ever

    # -- receiving -------------------------------------------------------------------
    def subscribe(
        self,
        subject: str,
        callback: Callable[[Msg], object] | None = None,
        *,
        queue: str | None = None,
        max_pending_msgs: int = DEFAULT_MAX_MSGS,
        max_pending_bytes: int = DEFAULT_MAX_BYTES,
        dispatcher: Dispatcher | None = None,
        timeout: float | None = None,
    ) -> Subscription:
        """Subscribe to *subject* (wildcards allowed: ``*`` a token, ``>`` the rest).

        With a *callback*, each message is passed to it on a worker thread (never the
        event-loop thread): the subscription's own thread, or *dispatcher*'s threads
        shared with other subscriptions (see :meth:`dispatcher`); either way in order,
        one at a time. Without one, read with :meth:`Subscription.next_msg` or by
        iterating. Beyond *max_pending_msgs* or *max_pending_bytes* waiting, new messages
        for this subscription are dropped, counted (``sub.dropped``, ``stats()``) and
        reported at WARNING; other subscriptions are not affected. Returns once the
        server has registered the interest. Subscriptions are made again after a
        reconnection; what the server routed during an outage is not received.

        :raises InvalidMessageError: for an invalid subject filter, queue group or limit,
            or a subject and queue group together too long for the server's control line.
        :raises InvalidTypeError: for arguments of the wrong type.
        :raises ConnectError: when the cluster cannot be reached.
        :raises RefusedError: when the server refused the subscription (permissions,
            limits).
        :raises ClusterUnavailableError: when the connection was lost while subscribing.
        :raises ClusterTimeoutError: when the server did not confirm within *timeout* s.
        :raises ClusterClosedError: after :meth:`close`.
        :raises WrongThreadError: on the event-loop thread.
        """
        return open_subscription(
            [self],
            self.name,
            subject,
            callback,
            queue=queue,
            max_pending_msgs=max_pending_msgs,
            max_pending_bytes=max_pending_bytes,
            dispatcher=dispatcher,
            timeout=self._wait(timeout),
        )

    def _add(self, receiver: Receiver, wait: float) -> None:
        """Subscribe *receiver* on this cluster, within *wait* s (see :meth:`subscribe`)."""
        self._enter()
        self._portal.add(receiver, wait)

    def serve(
        self,
        subject: str,
        handler: Handler,
        *,
        queue: str | None = None,
        workers: int = 1,
        timeout: float | None = None,
    ) -> Subscription:
        """Answer the requests sent to *subject*: ``handler(msg)`` runs on *workers*
        threads (never the event loop; concurrently when *workers* > 1) and returns the
        reply, ``bytes`` or ``(bytes, headers)``, which the library sends. A handler that
        raises is logged with its traceback and answered at once with the headers
        ``Nats-Service-Error`` and ``Nats-Service-Error-Code: 500`` (the requester gets a
        :class:`ServiceError`); one that raises ``ServiceError(code, description)`` is
        answered with that code. Give a *queue* to spread requests over processes.
        Unsubscribing (or closing the cluster) stops the workers and joins them.

        :raises InvalidMessageError, InvalidTypeError: for bad arguments.
        :raises ConnectError, ClusterTimeoutError, ClusterClosedError, WrongThreadError:
            as :meth:`subscribe`.
        """
        count = check_workers(handler, workers)
        name = f"openfactory-nats-{self.name}-serve-{subject}"
        workers_ = Workers(handler, count, self._core.logger, name)
        sub = open_subscription(
            [self], self.name, subject, None, queue=queue, timeout=self._wait(timeout), workers=workers_
        )
        self._workers[:] = [t for t in self._workers if t.is_alive()] + list(sub.workers)  # forget ended ones
        return sub

    # -- services (ADR-32) -----------------------------------------------------------
    def service(
        self,
        name: str,
        version: str,
        *,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        queue_group: str = DEFAULT_QUEUE_GROUP,
        timeout: float | None = None,
    ) -> Service:
        """Start a NATS service (ADR-32): see :class:`Service`. It stops with
        :meth:`Service.stop` or this cluster's :meth:`close`.

        :raises InvalidMessageError, InvalidTypeError: for a bad name, version,
            description, metadata or queue group; otherwise as :meth:`subscribe`.
        """
        return Service(
            self,
            name,
            version,
            description=description,
            metadata=metadata,
            queue_group=queue_group,
            logger=self._core.logger,
            timeout=timeout,
        )

    def discover(self, name: str | None = None, timeout: float = 1.0) -> list[ServiceInstance]:
        """The running instances of service *name* (of every service when None), written
        with any NATS client: their PING, INFO and STATS responses, gathered for *timeout*
        s after the requests are sent (instances that answer later are not listed);
        subscribing and sending take *timeout* s at most too.

        :raises InvalidMessageError, InvalidTypeError: for a bad name or timeout;
            otherwise as :meth:`subscribe` (``ClusterTimeoutError``: a stalled server).
        """
        return discover(self, name, timeout, self._core.logger)

    def _send_to(
        self, subject: str, reply: str, payload: bytes, timeout: float | None, *, counted: bool = True
    ) -> None:
        """Queue *payload* for *subject* with the reply subject *reply* (discovery, pull
        requests), connecting first if need be, within *timeout* s; *counted* in ``requests``."""
        self._enter()
        self._portal.send_with_reply(subject, reply, payload, self._wait(timeout), counted=counted)

    def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Msg:
        """Send a request to *subject* and return the reply. Any number of threads may
        request at once; replies come through one inbox subscription. During an outage
        it waits, within *timeout*, for the reconnection.

        :raises NoRespondersError: at once, when nobody listens on *subject*.
        :raises ServiceError: when the service answered with an error (``code``,
            ``description``).
        :raises ClusterTimeoutError: when no reply came within *timeout* s (a reply
            coming later is dropped).
        :raises InvalidMessageError, InvalidTypeError: for a bad subject, payload or headers.
        :raises ClusterClosedError: after :meth:`close` (also when it starts meanwhile).
        :raises WrongThreadError: on the event-loop thread.
        """
        if (hook := _tracing.HOOK) is not None:  # read once: uninstrument() may clear it
            if type(headers) is not _tracing.Traced:
                return hook.request(self.request, self._core, subject, payload, timeout, headers)
            headers = headers or None
        if self._forked:
            self._renew_after_fork()
        if threading.get_ident() == self._loop_ident and self._runner.in_loop_thread():  # ids are reused
            raise WrongThreadError("This method cannot be called from the event loop thread", cluster=self.name)
        wait = self._timeout if timeout is None else check_timeout(timeout)
        return self._portal.request(self._core.incoming.request_life(subject, payload, headers, wait, time.monotonic))

    def jetstream(self) -> JetStream:
        """A JetStream handle bound to this cluster (streams, consumers, pull
        subscriptions, worker pools): cheap, thread-safe, reusable."""
        self._enter()
        return JetStream(self, self._timeout)

    def dispatcher(self, threads: int = 4) -> Dispatcher:
        """Worker threads to share among subscriptions with callbacks (pass it as
        ``dispatcher=``): each subscription keeps its order, at most one of its messages
        in a callback at a time. Closed, and its threads joined, with the cluster."""
        self._enter()
        made = Dispatcher(threads, name=f"openfactory-nats-{self.name}-dispatcher")
        self._dispatchers[:] = [d for d in self._dispatchers if not d.closed] + [made]
        return made

    def _remove(self, receiver: Receiver, drain: bool, timeout: float) -> bool:
        """Unsubscribe *receiver* on the loop (nothing to do once the cluster closes);
        False when a drain ran out of time."""
        if self._forked:
            return True
        return self._portal.remove(receiver, drain, timeout)

    def _check_thread(self) -> None:
        self.thread_check()()

    def thread_check(self) -> Callable[[], None]:
        """A function that raises ``WrongThreadError`` on this cluster's event-loop thread
        (it holds the loop thread, not the instance)."""
        return functools.partial(refuse_loop_thread, self._runner, self.name)

    # -- helpers -------------------------------------------------------------------
    def _wait(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else check_timeout(timeout)

    def _enter(self) -> NatsCluster:
        """The core of this process, for a blocking call from a thread that may block."""
        if self._forked:
            self._renew_after_fork()
        if self._runner.in_loop_thread():
            raise WrongThreadError("This method cannot be called from the event loop thread", cluster=self.name)
        self._core.check_open()
        return self._core

    def _after_fork_in_child(self) -> None:
        # Every lock a parent thread may have held at the fork is renewed: the child's
        # close() and exit go through them. An instance closed in the parent stays closed
        # here; one still open, or closing, is made again on first use.
        self._fork_lock = threading.Lock()
        self._holdings.lock = threading.Lock()
        if self._core.state is not ClusterState.CLOSED:
            self._forked = True

    def _renew_after_fork(self) -> None:
        with self._fork_lock:
            if not self._forked:
                return
            self._finalizer.detach()  # what the child inherited belongs to the parent
            closed = forking.leave_to_parent(self._runner, self._core)
            self._core = NatsCluster(*self._args, **self._options)
            if closed:
                self._core.begin_close()
            self._start()
            self._forked = False
