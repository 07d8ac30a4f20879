"""A worker pool with ``prefetch``: batches fetched by a feeder, queued messages kept alive
with ``in_progress``, what is queued at ``stop()`` naked back; nats-py checks the server side."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from openfactory_nats import InvalidMessageError, JetStream, JsMsg, SyncNatsCluster

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


@pytest.mark.timeout(60)
def test_a_prefetching_pool_handles_every_message_once_while_first_deliveries_fail(
    js: JetStream, nc: SyncNatsCluster, peer: Peer
) -> None:
    fill(peer, js, 1500)
    ok: Counter[bytes] = Counter()
    lock = threading.Lock()
    threads: set[str] = set()

    def handler(msg: JsMsg) -> None:
        threads.add(threading.current_thread().name)
        if int(msg.data) % 7 == 0 and msg.metadata.num_delivered == 1:
            raise RuntimeError("first delivery fails")
        with lock:
            ok[msg.data] += 1

    pool = js.consume("jobs.>", handler, "pool", workers=4, prefetch=50, ack_wait=10.0)
    assert wait_until(lambda: len(ok) == 1500, timeout=40)
    assert wait_until(lambda: peer.consumer_info("JOBS", "pool").num_ack_pending == 0, timeout=10)
    pool.stop()
    assert set(ok.values()) == {1}
    assert pool.failed == 215 and pool.processed == 1500
    stats = nc.stats()
    assert stats["js_failed"] == 215 and stats["js_processed"] == 1500
    info = peer.consumer_info("JOBS", "pool")
    assert info.num_pending == 0 and info.ack_floor.stream_seq == 1500
    assert len(threads) > 1 and not any("loop" in name for name in threads)
    assert not any(t.is_alive() for t in pool.workers)


@pytest.mark.timeout(60)
def test_queued_messages_are_kept_alive_past_their_ack_wait(js: JetStream, peer: Peer) -> None:
    """One slow worker, ten queued messages, an ack wait of 1 s: the last ones wait about
    3 s in the queue, and none is redelivered."""
    fill(peer, js, 10)
    seen: list[tuple[bytes, int]] = []

    def slow(msg: JsMsg) -> None:
        seen.append((msg.data, msg.metadata.num_delivered))
        threading.Event().wait(0.3)

    pool = js.consume("jobs.>", slow, "slow", workers=1, prefetch=20, ack_wait=1.0)
    assert wait_until(lambda: len(seen) == 10, timeout=20)
    assert wait_until(lambda: peer.consumer_info("JOBS", "slow").num_ack_pending == 0, timeout=5)
    threading.Event().wait(1.5)  # more than the ack wait: a redelivery would show now
    pool.stop()
    assert sorted(int(d) for d, _ in seen) == list(range(10))
    assert all(n == 1 for _, n in seen)
    assert peer.consumer_info("JOBS", "slow").num_redelivered == 0


@pytest.mark.timeout(60)
def test_stop_naks_what_is_queued_so_it_comes_back_at_once(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 20)
    started = threading.Event()
    release = threading.Event()
    handled: list[bytes] = []

    def blocking(msg: JsMsg) -> None:
        handled.append(msg.data)
        started.set()
        release.wait(10)

    pool = js.consume("jobs.>", blocking, "queued", workers=1, prefetch=30, ack_wait=60.0)
    assert started.wait(10)
    assert wait_until(lambda: peer.consumer_info("JOBS", "queued").num_ack_pending == 20, timeout=5)
    threading.Timer(0.3, release.set).start()
    pool.stop(timeout=5)
    assert handled == [b"0"]  # the running handler finished; nothing else started
    # the 19 queued ones were naked: nats-py gets them now, long before their 60 s ack wait
    again: list[Any] = []
    assert wait_until(lambda: len(again.__iadd__(peer.fetch("jobs.>", "queued", "JOBS", 19, 1.0))) >= 19, 10)
    assert sorted(int(m.data) for m in again) == list(range(1, 20))


@pytest.mark.timeout(30)
def test_bad_prefetch_is_refused_in_the_caller(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 1)
    for bad in (-1, 100_001, 1.5, True, "10"):
        with pytest.raises((InvalidMessageError, TypeError)):
            js.consume("jobs.>", lambda m: None, "x", prefetch=bad)  # type: ignore[arg-type]
    with pytest.raises(Exception) as info:
        peer.consumer_info("JOBS", "x")  # nothing was made on the server
    assert "not found" in str(info.value).lower()
