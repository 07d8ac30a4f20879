"""A forked child never waits for a lock that a parent thread held at the moment of fork.

Each child runs with a deadline: the parent kills it when it does not end in time, and
the test fails, instead of hanging with it.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from openfactory_nats import ClusterTimeoutError, SyncClusterRouter, SyncNatsCluster

from .servers import NatsServer

CHILD_DEADLINE = 10.0


def run_child(body: Callable[[], object], deadline: float = CHILD_DEADLINE) -> str:
    """Fork; the child runs *body* and ends (status 0, or 1 when *body* raised). Returns
    how the child ended: "ok", "failed" or "hung" (killed after *deadline* s)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    ends = time.monotonic() + deadline
    while time.monotonic() < ends:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "ok" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


def normal_exit() -> None:
    """What the interpreter runs at a normal exit, the finalizers of what is still open among it."""
    atexit._run_exitfuncs()


class Busy:
    """A cluster and a router whose loop threads are busy delivering: a publisher, callback
    subscriptions (on a shared dispatcher, on their own thread), a service and requests."""

    def __init__(self, url: str, logger: logging.Logger) -> None:
        self.cluster = SyncNatsCluster("fork", [url], logger)
        self.router = SyncClusterRouter({"R1": [url], "R2": [url]}, logger)
        self.dispatcher = self.cluster.dispatcher(2)
        self.router_dispatcher = self.router.dispatcher(2)
        self.received = 0
        self.answered = 0
        self.subs = [
            self.cluster.subscribe("busy.>", self._count, dispatcher=self.dispatcher),
            self.cluster.subscribe("busy.>", self._count),
            self.cluster.subscribe("busy.>"),
            self.cluster.serve("svc", lambda msg: msg.data, workers=2),
            self.router.subscribe_all("busy.>", self._count, dispatcher=self.router_dispatcher),
            self.router.serve("k", "rsvc", lambda msg: msg.data),
        ]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._publish), threading.Thread(target=self._request)]
        for thread in self._threads:
            thread.start()

    def _count(self, msg: Any) -> None:
        self.received += 1

    def _publish(self) -> None:
        while not self._stop.is_set():
            for i in range(8):
                self.cluster.publish(f"busy.{i % 4}", b"x" * 64)
                self.router.publish("k", f"busy.{i % 4}", b"y" * 64)
            time.sleep(0.002)

    def _request(self) -> None:
        while not self._stop.is_set():
            try:
                self.cluster.request("svc", b"ping", timeout=5)
                self.router.request("k", "rsvc", b"ping", timeout=5)
                self.answered += 1
            except ClusterTimeoutError:
                pass  # the loop thread was held up by the test

    def inboxes(self) -> list[Any]:
        return [sub._inbox for sub in self.subs]

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.router.close()
        self.cluster.close()


@pytest.fixture
def busy(server: NatsServer, logger: logging.Logger) -> Iterator[Busy]:
    made = Busy(server.url, logger)
    try:
        deadline = time.monotonic() + 10
        while made.received < 100 or made.answered < 10:
            assert time.monotonic() < deadline, "nothing delivered"
            time.sleep(0.01)
        yield made
    finally:
        made.close()


def close_everything(busy: Busy) -> None:
    busy.cluster.close(timeout=2)
    busy.router.close(timeout=2)
    busy.dispatcher.close(timeout=1)
    for sub in busy.subs:
        sub.unsubscribe(timeout=1)
    normal_exit()


def use_then_exit(busy: Busy) -> None:
    """Use the instances, then leave them to the finalizers of the interpreter's exit."""
    busy.cluster.publish("child", b"x")
    busy.router.publish("k", "child", b"x")
    normal_exit()


@pytest.mark.timeout(60)
def test_a_child_forked_while_the_loop_thread_holds_every_lock_closes_and_exits(busy: Busy) -> None:
    """The parent's loop thread holds, across the fork, every lock of what the child may
    touch when it closes or exits: the dispatchers', the inboxes' (their condition and
    their ``done`` event), the request relay's and the close locks."""
    core = busy.cluster.cluster
    replies = core.incoming.replies()
    assert replies is not None
    locks: list[Any] = [busy.dispatcher._lock, busy.router_dispatcher._lock, replies._relay_lock]
    locks += [core.incoming.receivers._lock, core.incoming.receivers.tally._lock]  # membership, counts
    for inbox in busy.inboxes():
        locks += [inbox._lock, inbox._done._cond]
        if inbox._dispatcher is not None:
            locks.append(inbox._dispatcher._lock)
    locks += [busy.cluster._holdings.lock, busy.router._close_lock]
    for cluster in busy.router.clusters.values():
        locks.append(cluster._holdings.lock)
    locks = list({id(lock): lock for lock in locks}.values())

    def hold(held: threading.Event, release: threading.Event) -> None:
        """On the loop thread, as if it was delivering at the fork."""
        for lock in locks:
            lock.acquire()
        held.set()
        release.wait(2 * CHILD_DEADLINE)
        for lock in locks:
            lock.release()

    for mode in (close_everything, use_then_exit):
        held, release = threading.Event(), threading.Event()
        try:
            busy.cluster.loop.call_soon_threadsafe(hold, held, release)
            assert held.wait(10)
            outcome = run_child(functools.partial(mode, busy))
        finally:
            release.set()
        assert outcome == "ok", f"{mode.__name__}: the child {outcome}"
    assert busy.cluster.is_connected  # the parent goes on


@pytest.mark.timeout(60)
def test_children_forked_during_busy_delivery_close_and_exit(busy: Busy) -> None:
    """Without instrumenting: many forks while the loop threads deliver, with thread
    switches as frequent as they go, so that a lock is held at some fork."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    outcomes: list[str] = []
    try:
        for i in range(60):
            mode = close_everything if i % 2 else use_then_exit
            outcomes.append(run_child(functools.partial(mode, busy), deadline=5.0))
            if outcomes[-1] != "ok":
                break
    finally:
        sys.setswitchinterval(interval)
    assert outcomes == ["ok"] * len(outcomes)
