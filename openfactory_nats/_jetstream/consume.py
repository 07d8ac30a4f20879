"""A pool of worker threads processing the messages of a JetStream consumer.

Each worker fetches for itself, one message at a time, through a pull subscription of
its own to the pool's consumer: only what idle workers can take is fetched, so no message
waits in this process while its ack wait runs, and a message whose handler still runs is
not fetched again by the same pool. The worker then runs the handler and acknowledges: a
handler returning acks, one raising naks (the server redelivers), one that acked, naked or
termed itself is left alone. The acknowledgement and the worker's next pull request leave
in one write. ``stop()`` ends the fetching (within a second) and lets running handlers finish.
With ``prefetch``, a feeder fetches in batches for the workers instead (``feeder``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .. import _tracing
from .._errors import (
    ClusterClosedError,
    ClusterTimeoutError,
    ConsumerNotFoundError,
    NatsClusterError,
    StreamNotFoundError,
)
from .feeder import Feeder
from .msg import JsMsg

__all__ = ("Consumer", "Handler")

Handler = Callable[[JsMsg], Any]

#: How long one fetch of a worker waits for a message.
_POLL = 1.0
_BACKOFF = 0.5


class PullSubscription(Protocol):
    """What the pool needs of a pull subscription."""

    @property
    def consumer(self) -> str: ...

    def fetch(self, batch: int = 1, timeout: float | None = None) -> list[JsMsg]: ...

    def unsubscribe(self, timeout: float | None = None) -> None: ...


class Consumer:
    """A running worker pool (``js.consume(...)``).

    :ivar processed: messages whose handler returned (acked).
    :ivar failed: messages whose handler raised (naked).
    """

    def __init__(
        self,
        subs: Sequence[PullSubscription],
        handler: Handler,
        logger: logging.Logger,
        count: Callable[[str, int], None],
        on_stop: Callable[[float], None] = lambda timeout: None,
        *,
        workers: int = 0,
        prefetch: int = 0,
        ack_wait: float = 30.0,
    ) -> None:
        self._subs = list(subs)
        self.consumer = self._subs[0].consumer
        self._handler = handler
        self._logger = logger
        self._count = count
        self._on_stop = on_stop
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        #: The process that runs the pool: in a forked child, stop() touches none of it.
        self._pid = os.getpid()
        self.processed = 0
        self.failed = 0
        #: Names of the workers running the handler (or acknowledging after it).
        self._handling: set[str] = set()
        name = f"openfactory-nats-consume-{self.consumer}"
        self._feeder: Feeder | None = None
        if prefetch:  # one subscription, fed in batches
            self._feeder = Feeder(self._subs[0], workers, prefetch, ack_wait, logger, name)
            self._threads = [
                threading.Thread(target=self._take, name=f"{name}-{i}", daemon=True) for i in range(workers)
            ]
        else:  # each worker fetches for itself
            self._threads = [
                threading.Thread(target=self._work, args=(sub,), name=f"{name}-{i}", daemon=True)
                for i, sub in enumerate(self._subs)
            ]
        for thread in self._threads:
            thread.start()

    def __repr__(self) -> str:
        return f"<Consumer {self.consumer!r} processed={self.processed} failed={self.failed}>"

    @property
    def running(self) -> bool:
        """True until :meth:`stop` ended it, or the cluster's close, the consumer or its
        stream deleted on the server (logged as an error), or handlers raising a
        BaseException in every worker."""
        return not self._stopping.is_set() and any(t.is_alive() for t in self._threads)

    @property
    def workers(self) -> tuple[threading.Thread, ...]:
        return tuple(self._threads)

    def _work(self, sub: PullSubscription) -> None:
        stopping = self._stopping
        while not stopping.is_set():
            try:
                msgs = sub.fetch(1, _POLL)
            except ClusterClosedError:  # the cluster closed, or the pool was stopped
                stopping.set()
                return
            except (ConsumerNotFoundError, StreamNotFoundError) as exc:
                self._gone(exc)
                return
            except NatsClusterError as exc:
                self._logger.warning("consumer %s: fetch failed, retrying: %s", self.consumer, exc)
                stopping.wait(_BACKOFF)
                continue
            for msg in msgs:
                if stopping.is_set():  # fetched while stopping: back to the server at once
                    _nak_quietly(msg)
                elif not self._run(msg):
                    return  # the handler raised a BaseException: this worker ends

    def _gone(self, exc: NatsClusterError) -> None:
        """The consumer or its stream was deleted on the server: nothing more will come."""
        with self._lock:
            first = not self._stopping.is_set()
            self._stopping.set()
        if first:
            self._logger.error("consumer %s: %s; the pool stops", self.consumer, exc)

    def _take(self) -> None:
        feeder = self._feeder
        assert feeder is not None
        while (msg := feeder.take()) is not None:
            alive = False
            try:
                alive = self._run(msg)
            finally:
                feeder.done(alive)
            if not alive:
                return  # the handler raised a BaseException: this worker ends
        self._stopping.set()  # the feeder stopped: stop(), the cluster's close, no worker left

    def _run(self, msg: JsMsg) -> bool:
        """Handle *msg*; False when the worker is to end."""
        name = threading.current_thread().name
        with self._lock:
            self._handling.add(name)
        try:
            return self._handle(msg)
        finally:
            with self._lock:
                self._handling.discard(name)

    def _handle(self, msg: JsMsg) -> bool:
        """Run the handler and settle *msg*; False when the handler raised a
        BaseException (SystemExit...): the message is naked and the worker ends."""
        try:
            if (hook := _tracing.HOOK) is not None:  # read once: uninstrument() may run meanwhile
                hook.jetstream(self._handler, msg, self.consumer)
            else:
                self._handler(msg)
        except BaseException as exc:
            fatal = not isinstance(exc, Exception)
            self._logger.exception(
                "consumer %s: handler failed on %r (delivery %s); nak%s",
                self.consumer,
                msg.subject,
                _delivery(msg),
                "; this worker ends" if fatal else "",
            )
            with self._lock:
                self.failed += 1
            self._count("js_failed", 1)
            self._settle(msg, failed=True)
            return not fatal
        with self._lock:
            self.processed += 1
        self._count("js_processed", 1)
        self._settle(msg, failed=False)
        return True

    def _settle(self, msg: JsMsg, *, failed: bool) -> None:
        if msg.acked:  # the handler acked, naked or termed it itself
            return
        try:
            if failed:
                msg.nak()
            else:
                msg.ack()
        except NatsClusterError as exc:  # counted by the acker; the server redelivers it
            self._logger.warning("consumer %s: could not acknowledge %r: %s", self.consumer, msg.subject, exc)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop fetching (a fetch in progress ends within a second, what it got is naked
        back); let running handlers finish within *timeout* s. Idempotent. In a forked
        child, a pool made by the parent only reads as stopped there: the parent's goes on.

        :raises ClusterTimeoutError: when handlers were still running after *timeout* s
            (they finish in the background; their messages are acked then).
        """
        deadline = time.monotonic() + timeout
        self._stopping.set()
        if os.getpid() != self._pid:  # a forked child: the threads, the consumer, the
            return  # messages fetched and queued are the parent's (its workers do not run here)
        me = threading.current_thread()
        if self._feeder is not None:
            self._feeder.stop()
            self._feeder.thread.join(max(0.0, deadline - time.monotonic()))
        # A fetch in progress ends by itself within _POLL s, and what the server sent it is
        # naked back at once; unsubscribing under it would discard those messages, left to
        # wait for their ack wait. Only the fetches still running at the deadline are cut.
        for thread in self._threads:
            if thread is not me:
                thread.join(max(0.0, deadline - time.monotonic()))
        for sub in self._subs:
            try:
                sub.unsubscribe(max(0.0, deadline - time.monotonic()))
            except NatsClusterError as exc:
                self._logger.debug("consumer %s: unsubscribe: %s", self.consumer, exc)
        with self._lock:
            busy = [t.name for t in self._threads if t.name in self._handling and t is not me]
        self._on_stop(max(0.0, deadline - time.monotonic()))
        if busy:
            raise ClusterTimeoutError(
                f"consumer {self.consumer!r}: {len(busy)} handler(s) still running after {timeout:g} s"
            )

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _nak_quietly(msg: JsMsg) -> None:
    try:
        msg.nak()
    except NatsClusterError:
        pass  # counted by the acker; the server redelivers it after its ack wait


def _delivery(msg: JsMsg) -> object:
    try:
        return msg.metadata.num_delivered
    except NatsClusterError:
        return "?"
