"""Edges of a prefetching worker pool (``consume(..., prefetch=N)``): the largest prefetch,
a handler raising a BaseException, the cluster's close; nats-py checks the server side."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest

from openfactory_nats import JetStream, JsMsg, SyncNatsCluster

from .jspeer import Peer, wait_until
from .servers import NatsServer


@pytest.fixture
def nc(jetstream_server: NatsServer, logger: logging.Logger) -> Iterator[SyncNatsCluster]:
    with SyncNatsCluster("JS", [jetstream_server.url], logger, reconnect_time_wait=0.1) as cluster:
        yield cluster


@pytest.fixture
def js(nc: SyncNatsCluster) -> JetStream:
    return nc.jetstream()


def fill(peer: Peer, js: JetStream, n: int) -> None:
    js.add_stream("JOBS", ["jobs.>"])
    peer.publish_many([(f"jobs.{i % 3}", b"%d" % i) for i in range(n)])


@pytest.mark.timeout(30)
def test_the_largest_prefetch_still_fetches(js: JetStream, peer: Peer) -> None:
    """prefetch=100000 is accepted, and idle workers plus it ask for more than the largest
    batch of a fetch: the feeder must ask for no more than that, not fail for ever."""
    fill(peer, js, 10)
    seen: list[bytes] = []
    pool = js.consume("jobs.>", lambda m: seen.append(m.data), "big", workers=4, prefetch=100_000)
    try:
        assert wait_until(lambda: len(seen) == 10, timeout=10), seen
    finally:
        pool.stop()


@pytest.mark.timeout(30)
def test_a_handler_raising_a_base_exception_leaves_no_message_held(js: JetStream, peer: Peer) -> None:
    """The only worker's handler raises SystemExit: its worker ends (as without prefetch),
    its message is naked, and the feeder, with no worker left, stops and naks what it
    queued, instead of keeping it alive for ever: another client gets all at once."""
    fill(peer, js, 10)

    def fatal(msg: JsMsg) -> None:
        raise SystemExit("handler gave up")

    pool = js.consume("jobs.>", fatal, "fatal", workers=1, prefetch=20, ack_wait=30.0)
    assert wait_until(lambda: not any(t.is_alive() for t in pool.workers), timeout=5)
    assert wait_until(lambda: not pool.running, timeout=5)
    got: list[object] = []
    assert wait_until(lambda: len(got.__iadd__(peer.fetch("jobs.>", "fatal", "JOBS", 10, 1.0))) >= 10, 10), got
    pool.stop(1)


@pytest.mark.timeout(30)
def test_closing_the_cluster_ends_a_prefetching_pool(
    jetstream_server: NatsServer, peer: Peer, logger: logging.Logger
) -> None:
    cluster = SyncNatsCluster("JS", [jetstream_server.url], logger, reconnect_time_wait=0.1)
    js = cluster.jetstream()
    fill(peer, js, 3)
    seen: list[bytes] = []
    pool = js.consume("jobs.>", lambda m: seen.append(m.data), "closing", workers=2, prefetch=10)
    assert wait_until(lambda: len(seen) == 3)
    cluster.close(5)
    assert wait_until(lambda: not any(t.is_alive() for t in pool.workers), timeout=5)
    assert wait_until(lambda: not pool.running, timeout=5)
    assert not any(t.name.endswith("-feeder") and t.is_alive() for t in threading.enumerate())
    pool.stop(1)


@pytest.mark.timeout(120)
def test_a_fetch_of_large_messages_never_overflows_its_inbox(js: JetStream, nc: SyncNatsCluster, peer: Peer) -> None:
    """100 messages of about 1 MB: one fetch of 100 is more than a subscription's default
    byte limit (64 MiB). The server is asked for no more bytes than the inbox holds, so
    nothing is dropped on the way: every message comes, in order, through a few fetches."""
    js.add_stream("BIG", ["big.>"])
    payload = b"x" * 1_000_000
    peer.publish_many([("big.x", payload)] * 100, window=20)
    sub = js.pull_subscribe("big.>", "big")
    got: list[int] = []
    deadline = time.monotonic() + 60
    while len(got) < 100 and time.monotonic() < deadline:
        for msg in sub.fetch(100, 5.0):
            assert msg.data == payload
            got.append(msg.metadata.sequence.stream)
            msg.ack()
    assert got == list(range(1, 101))
    assert nc.stats()["receive_dropped"] == 0
