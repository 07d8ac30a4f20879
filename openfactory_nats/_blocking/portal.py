"""Blocking calls from threads into one core, run on its loop thread.

A :class:`Portal` joins a core to the loop thread it runs on (both replaced together in
a forked child). It submits the core's coroutines to the loop and waits for each with a
timeout, turning what can go wrong on the way into the library's errors: the loop gone
(closing, or stopped under the call), no answer in time (a ``TimeoutError``, a
connection's own when connecting). Its calls connect for a publish that found no client
open, and subscribe and unsubscribe the receivers of the facade's subscriptions.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from .._core.cluster import NatsCluster
from .._core.incoming import CONNECT, RequestLife
from .._core.lifecycle import ClusterState
from .._errors import ClusterClosedError, ClusterTimeoutError, ClusterUnavailableError, WrongThreadError
from .._message import Msg
from .._receive.receivers import Receiver
from .loop import LoopThread

__all__ = ("Portal", "refuse_loop_thread")

T = TypeVar("T")


class Portal:
    """The blocking calls into *core*, on *runner*'s loop."""

    def __init__(self, runner: LoopThread, core: NatsCluster) -> None:
        self._runner = runner
        self._core = core

    def call(self, coro: Coroutine[Any, Any, T], timeout: float, *, connecting: bool = False) -> T:
        """Run *coro* on the loop and return its outcome, waiting up to *timeout* s.

        :raises ConnectTimeoutError: with *connecting*, when *timeout* ran out.
        :raises ClusterTimeoutError: when *timeout* ran out otherwise.
        :raises ClusterClosedError, ClusterUnavailableError: when the loop is gone.
        """
        try:
            future = self._runner.submit(coro)
        except RuntimeError:  # the loop is gone: the instance is closing
            coro.close()
            raise self._gone() from None
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done() and not future.cancelled():
                return future.result(0)  # the coroutine's own outcome, a timeout of ours included
            future.cancel()
            if connecting:
                raise self._core.connect_timeout_error(timeout) from None
            raise ClusterTimeoutError(
                f"cluster {self._core.name!r}: no answer within {timeout:g} s", cluster=self._core.name
            ) from None
        except concurrent.futures.CancelledError:
            raise self._gone() from None  # the loop stopped under the call

    def _gone(self) -> ClusterUnavailableError:
        name = self._core.name
        if self._core.state in (ClusterState.CLOSING, ClusterState.CLOSED):
            return ClusterClosedError(f"cluster {name!r} is closed", cluster=name)
        return ClusterUnavailableError(f"cluster {name!r}: its event loop stopped", cluster=name)

    def connect_and_offer(self, subject: object, payload: object, headers: object, wait: float) -> None:
        """Validate a message, connect, then queue it, all within *wait* s (a publish
        that found no client open)."""
        core = self._core
        deadline = time.monotonic() + wait
        core.prepare(subject, payload, headers)  # refuse bad input before connecting
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            self.call(core.connect(), remaining, connecting=True)
            if core.outgoing.offer(subject, payload, headers, max(0.0, deadline - time.monotonic())):
                return

    def send_with_reply(self, subject: str, reply: str, payload: bytes, wait: float, *, counted: bool = True) -> None:
        """Queue *payload* for *subject* with the reply subject *reply* (the caller gathers
        the replies itself), connecting first if need be, within *wait* s; *counted* in
        ``requests`` (a JetStream pull request is not)."""
        core = self._core
        deadline = time.monotonic() + wait
        while not core.incoming.offer_request(
            subject, reply.encode(), payload, None, max(0.0, deadline - time.monotonic()), counted=counted
        ):
            self.call(core.connect(), max(0.0, deadline - time.monotonic()), connecting=True)

    def request(self, life: RequestLife) -> Msg:
        """Drive a request's life (``Incoming.request_life``) from a blocked thread: wait
        for what it asks for, and return its reply."""
        core = self._core
        try:
            step, left, waiter = next(life)
            while True:
                if waiter is not None:
                    waiter.wait(left)
                    step, left, waiter = life.send(None)
                elif step == CONNECT:
                    self.call(core.connect(), left, connecting=True)
                    step, left, waiter = life.send(None)
                else:  # REPLIES: bounded on its own, as it is shared by every first request
                    step, left, waiter = life.send(self.call(core.incoming.ensure_replies(left), left + 1.0))
        except StopIteration as end:
            reply: Msg = end.value
            return reply
        finally:
            life.close()  # a wait that raised: the request is forgotten

    def add(self, receiver: Receiver, wait: float) -> None:
        """Subscribe *receiver* within *wait* s; on failure, leave nothing subscribed."""
        core = self._core
        try:
            self.call(core.incoming.add_receiver(receiver, wait), wait + 1.0)
        except BaseException:
            coro = core.incoming.remove_receiver(receiver, drain=False)  # if it got that far
            try:
                self._runner.submit(coro)
            except RuntimeError:
                coro.close()
            raise

    def remove(self, receiver: Receiver, drain: bool, timeout: float) -> bool:
        """Unsubscribe *receiver* (nothing to do once the core closes); False when a drain
        ran out of time."""
        if self._core.state in (ClusterState.CLOSING, ClusterState.CLOSED):
            return True
        refuse_loop_thread(self._runner, self._core.name)
        try:
            return self.call(self._core.incoming.remove_receiver(receiver, drain, timeout), timeout + 1.0)
        except ClusterClosedError:
            return True  # closing meanwhile: the close ends it


def refuse_loop_thread(runner: LoopThread, name: str) -> None:
    """:raises WrongThreadError: on *runner*'s loop thread."""
    if runner.in_loop_thread():
        raise WrongThreadError("This method cannot be called from the event loop thread", cluster=name)
