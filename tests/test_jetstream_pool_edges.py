"""The JetStream worker pool (``js.consume``, with and without ``prefetch``) at its edges:
a stopped (SIGSTOP) server, the cluster's close from another thread, a forked child, a
pool or cluster dropped without stop() or close(). Every call completes or raises one of
the library's errors within its timeout; every message the pool took is acked, naked or
redelivered after its ack wait (at least once, checked with nats-py): none is lost."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from openfactory_nats import JetStream, JsMsg, NatsClusterError, SyncNatsCluster

from .jspeer import Peer, wait_until
from .servers import NatsServer
from .test_forksafe import normal_exit, run_child
from .test_service_faults import MARGIN, in_thread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

PREFETCH = pytest.mark.parametrize("prefetch", [0, 10], ids=["own-fetch", "prefetch"])


@pytest.fixture
def nc(jetstream_server: NatsServer, logger: logging.Logger) -> Iterator[SyncNatsCluster]:
    with SyncNatsCluster("JS", [jetstream_server.url], logger, reconnect_time_wait=0.1, timeout=10.0) as cluster:
        yield cluster


@pytest.fixture
def js(nc: SyncNatsCluster) -> JetStream:
    return nc.jetstream()


class Tally:
    """A handler recording what it handled (the message numbers), thread-safe."""

    def __init__(self, pause: float = 0.0) -> None:
        self.pause = pause
        self.seen: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, msg: JsMsg) -> None:
        if self.pause:
            time.sleep(self.pause)
        with self.lock:
            self.seen.append(int(msg.data))

    def count(self) -> int:
        with self.lock:
            return len(self.seen)


def fill(peer: Peer, js: JetStream, n: int, start: int = 0) -> None:
    if start == 0:
        js.add_stream("POOL", ["pool.>"])
    peer.publish_many([(f"pool.{i % 3}", b"%d" % i) for i in range(start, start + n)])


def nothing_lost(peer: Peer, durable: str, handled: list[int], n: int, wait: float = 10.0) -> None:
    """Every one of the *n* messages was handled, or comes to another client (at once or
    after its ack wait): none is held unacknowledged for ever."""
    rest: set[int] = set()
    missing = set(range(n)) - set(handled)
    deadline = time.monotonic() + wait
    while missing - rest and time.monotonic() < deadline:
        got = peer.fetch("pool.>", durable, "POOL", batch=n, timeout=1.0)
        rest |= {int(m.data) for m in got}
        peer.ack(got)
    assert not missing - rest, f"lost: {sorted(missing - rest)}"


# -- a stopped server ------------------------------------------------------------------


@PREFETCH
def test_a_pool_goes_on_after_the_server_was_stopped_and_loses_nothing(
    jetstream_server: NatsServer, js: JetStream, peer: Peer, prefetch: int, thread_errors: list[BaseException]
) -> None:
    n = 200
    fill(peer, js, n)
    tally = Tally(0.005)
    pool = js.consume("pool.>", tally, "frozen", workers=4, prefetch=prefetch, ack_wait=5)
    assert wait_until(lambda: tally.count() >= 30)
    jetstream_server.pause()
    time.sleep(2.5)  # fetches time out, acks wait in the buffer
    jetstream_server.resume()
    assert wait_until(lambda: set(tally.seen) == set(range(n)), timeout=30), sorted(set(range(n)) - set(tally.seen))
    assert pool.running
    pool.stop(5)
    assert wait_until(lambda: peer.consumer_info("POOL", "frozen").num_ack_pending == 0)
    assert peer.consumer_info("POOL", "frozen").num_pending == 0
    assert thread_errors == []


@PREFETCH
def test_stop_while_the_server_is_stopped_keeps_its_timeout(
    jetstream_server: NatsServer, js: JetStream, peer: Peer, prefetch: int
) -> None:
    n = 50
    fill(peer, js, n)
    tally = Tally()
    pool = js.consume("pool.>", tally, None, workers=3, prefetch=prefetch, ack_wait=2)  # ephemeral
    assert wait_until(lambda: tally.count() == n)
    jetstream_server.pause()
    try:
        started = time.monotonic()
        try:
            pool.stop(2.0)
        except NatsClusterError:
            pass
        assert time.monotonic() - started < 2.0 + MARGIN
        assert not pool.running
    finally:
        jetstream_server.resume()


# -- close() from another thread -------------------------------------------------------


@PREFETCH
def test_close_while_a_handler_runs_and_stop_is_in_progress(
    jetstream_server: NatsServer, peer: Peer, logger: logging.Logger, prefetch: int, thread_errors: list[BaseException]
) -> None:
    n = 20
    cluster = SyncNatsCluster("closing", [jetstream_server.url], logger, reconnect_time_wait=0.1)
    js = cluster.jetstream()
    fill(peer, js, n)
    busy, release = threading.Event(), threading.Event()
    tally = Tally(0.01)

    def handler(msg: JsMsg) -> None:
        if int(msg.data) == 5:
            busy.set()
            release.wait(10)
        tally(msg)

    pool = js.consume("pool.>", handler, "closing", workers=3, prefetch=prefetch, ack_wait=2)
    assert busy.wait(10)
    stopping, stopped = in_thread(lambda: pool.stop(5))
    time.sleep(0.2)
    closing, closed = in_thread(lambda: cluster.close(5))
    time.sleep(0.2)
    release.set()
    stopping.join(5 + MARGIN)
    closing.join(5 + MARGIN)
    assert not stopping.is_alive() and not closing.is_alive()
    assert closed == [None]
    assert stopped == [None] or isinstance(stopped[0], NatsClusterError), stopped
    assert wait_until(lambda: not any(t.is_alive() for t in pool.workers), timeout=5)
    assert not pool.running
    pool.stop(1)
    nothing_lost(peer, "closing", tally.seen, n)
    assert thread_errors == []


def test_close_while_the_server_is_stopped_ends_a_running_pool(
    jetstream_server: NatsServer, peer: Peer, logger: logging.Logger, thread_errors: list[BaseException]
) -> None:
    n = 100
    cluster = SyncNatsCluster("closing", [jetstream_server.url], logger, reconnect_time_wait=0.1)
    js = cluster.jetstream()
    fill(peer, js, n)
    tally = Tally(0.01)
    pool = js.consume("pool.>", tally, "stalled", workers=4, prefetch=10, ack_wait=2)
    assert wait_until(lambda: tally.count() >= 10)
    jetstream_server.pause()
    try:
        started = time.monotonic()
        cluster.close(2)
        assert time.monotonic() - started < 2 + MARGIN + 2  # plus close's own margin
        assert wait_until(lambda: not any(t.is_alive() for t in pool.workers), timeout=5)
        assert not pool.running
    finally:
        jetstream_server.resume()
    nothing_lost(peer, "stalled", tally.seen, n)
    assert thread_errors == []


# -- a forked child --------------------------------------------------------------------


@PREFETCH
def test_a_forked_child_leaves_its_parent_s_pool_alone_and_runs_its_own(
    nc: SyncNatsCluster, js: JetStream, peer: Peer, prefetch: int
) -> None:
    fill(peer, js, 20)
    tally = Tally()
    held = threading.Event()

    def handler(msg: JsMsg) -> None:
        tally(msg)
        if tally.count() == 20:
            held.set()

    pool = js.consume("pool.>", handler, None, workers=2, prefetch=prefetch, ack_wait=30)  # ephemeral
    assert held.wait(10)

    def child() -> None:
        assert not pool.running  # its threads are the parent's
        pool.stop(1)  # touches nothing of the parent's: neither its consumer nor its messages
        mine = Tally()
        own = js.consume("pool.>", mine, "child", workers=2, prefetch=prefetch)  # the parent's handle
        assert wait_until(lambda: mine.count() >= 20, timeout=5)
        own.stop(2)
        nc.close(2)
        normal_exit()

    assert run_child(child) == "ok"
    assert pool.running
    fill(peer, js, 20, start=20)
    assert wait_until(lambda: sorted(tally.seen) == list(range(40)), timeout=10), sorted(tally.seen)
    pool.stop(5)


# -- dropped without stop() or close() ---------------------------------------------------


@PREFETCH
def test_a_pool_dropped_without_stop_runs_until_its_cluster_closes(
    jetstream_server: NatsServer, peer: Peer, logger: logging.Logger, prefetch: int, thread_errors: list[BaseException]
) -> None:
    cluster = SyncNatsCluster("dropping", [jetstream_server.url], logger, reconnect_time_wait=0.1)
    js = cluster.jetstream()
    fill(peer, js, 10)
    tally = Tally()
    pool = js.consume("pool.>", tally, "dropped", workers=2, prefetch=prefetch)
    threads = pool.workers
    del pool
    gc.collect()
    # A running pool is like a running thread: dropping it does not stop it.
    fill(peer, js, 10, start=10)
    assert wait_until(lambda: sorted(tally.seen) == list(range(20)))
    cluster.close(5)
    assert wait_until(lambda: not any(t.is_alive() for t in threads), timeout=5)
    assert thread_errors == []


def test_a_cluster_dropped_with_a_running_pool_hangs_nothing_and_ends_at_exit(
    jetstream_server: NatsServer, js: JetStream, peer: Peer, logger: logging.Logger
) -> None:
    fill(peer, js, 10)

    def child() -> None:
        other = SyncNatsCluster("other", [jetstream_server.url], logger)
        seen: list[Any] = []
        dropped = SyncNatsCluster("dropped", [jetstream_server.url], logger)
        dropped.jetstream().consume("pool.>", lambda m: seen.append(m.data), "orphan", workers=2, prefetch=5)
        del dropped
        gc.collect()
        assert wait_until(lambda: len(seen) == 10, timeout=5)  # the pool lives on
        other.publish("pool.x", b"10", ack=True, timeout=5)  # the other cluster works
        assert wait_until(lambda: len(seen) == 11, timeout=5)
        other.close(2)
        normal_exit()  # the finalizer closes what was dropped, within its timeout

    assert run_child(child) == "ok"
    info = peer.consumer_info("POOL", "orphan")
    assert (info.num_pending, info.num_ack_pending) == (0, 0), info
