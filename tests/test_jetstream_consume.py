"""The blocking JetStream consume side against a real server, with nats-py's own async
JetStream API on the other side: pull subscriptions shared between threads, every kind of
acknowledgement, the worker pool, errors, metadata and stream management."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import nats.js.errors
import pytest

from openfactory_nats import (
    ClusterTimeoutError,
    SyncNatsCluster,
)
from openfactory_nats._errors import (
    ConsumerNotFoundError,
    JetStreamError,
    StreamNotFoundError,
)
from openfactory_nats._jetstream.handle import JetStream
from openfactory_nats._jetstream.msg import JsMsg

from .jspeer import Peer, wait_until
from .servers import NatsServer


@pytest.fixture
def nc(jetstream_server: NatsServer, logger: logging.Logger) -> Iterator[SyncNatsCluster]:
    with SyncNatsCluster("JS", [jetstream_server.url], logger, reconnect_time_wait=0.1) as cluster:
        yield cluster


@pytest.fixture
def js(nc: SyncNatsCluster) -> JetStream:
    return nc.jetstream()


def fill(peer: Peer, js: JetStream, n: int, stream: str = "ORDERS", prefix: str = "orders") -> list[Any]:
    """A stream *stream* on ``<prefix>.>`` holding *n* messages published by nats-py (data: their index)."""
    js.add_stream(stream, [f"{prefix}.>"])
    return peer.publish_many([(f"{prefix}.{i % 5}", b"%d" % i) for i in range(n)])


def settled(peer: Peer, stream: str, consumer: str, floor: int) -> bool:
    """Everything up to stream sequence *floor* acked, nothing delivered and unacked."""
    info = peer.consumer_info(stream, consumer)
    return info.num_ack_pending == 0 and info.ack_floor.stream_seq == floor


# -- several threads, one durable ------------------------------------------------------


def _drain_in_threads(n: int, fetchers: list[Any]) -> list[int]:
    """Each fetcher on a thread of its own fetches and acks until *n* messages came in all."""
    seen: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    deadline = time.monotonic() + 20

    def work(fetch: Any) -> None:
        try:
            while time.monotonic() < deadline:
                with lock:
                    if len(seen) >= n:
                        return
                for m in fetch(7, 0.3):
                    m.ack()
                    with lock:
                        seen.append(int(m.data))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f,)) for f in fetchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    return seen


@pytest.mark.timeout(40)
def test_threads_with_their_own_pull_subscriptions_of_one_durable_get_each_message_once(
    js: JetStream, peer: Peer
) -> None:
    n = 600
    fill(peer, js, n)
    subs = [js.pull_subscribe("orders.>", "shared") for _ in range(4)]
    seen = _drain_in_threads(n, [s.fetch for s in subs])
    assert sorted(seen) == list(range(n))  # each once: none missing, none twice
    assert wait_until(lambda: settled(peer, "ORDERS", "shared", n))
    assert peer.consumer_info("ORDERS", "shared").num_redelivered == 0
    assert all(s.fetch(5, 0.3) == [] for s in subs)


@pytest.mark.timeout(40)
def test_threads_sharing_one_pull_subscription_get_each_message_once(js: JetStream, peer: Peer) -> None:
    n = 600
    fill(peer, js, n)
    sub = js.pull_subscribe("orders.>", "one")
    seen = _drain_in_threads(n, [sub.fetch] * 4)
    assert sorted(seen) == list(range(n))
    assert wait_until(lambda: settled(peer, "ORDERS", "one", n))
    assert sub.fetch(5, 0.3) == []
    assert sub.pending == 0


# -- acknowledgements ------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_nak_redelivers_at_once_with_num_delivered_2(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 1)
    sub = js.pull_subscribe("orders.>", "nak", ack_wait=30)
    [first] = sub.fetch(1, 2)
    assert first.metadata.num_delivered == 1
    first.nak()
    [again] = sub.fetch(1, 5)  # long before the ack wait
    assert again.data == first.data and again.metadata.sequence.stream == first.metadata.sequence.stream
    assert again.metadata.num_delivered == 2
    again.ack_sync(5)
    assert settled(peer, "ORDERS", "nak", 1)


@pytest.mark.timeout(20)
def test_nak_with_a_delay_is_redelivered_after_the_delay_not_before(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 1)
    sub = js.pull_subscribe("orders.>", "later", ack_wait=30)
    [first] = sub.fetch(1, 2)
    naked = time.monotonic()
    first.nak(delay=1.5)
    assert sub.fetch(1, 1.0) == []  # still inside the delay
    [again] = sub.fetch(1, 5)
    assert time.monotonic() - naked >= 1.4
    assert again.metadata.num_delivered == 2
    again.ack()


@pytest.mark.timeout(20)
def test_term_is_never_redelivered(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 2)
    sub = js.pull_subscribe("orders.>", "term", ack_wait=1)
    first, second = sub.fetch(2, 2)
    first.term()
    second.ack()
    assert sub.fetch(1, 2.5) == []  # well past the ack wait
    assert wait_until(lambda: settled(peer, "ORDERS", "term", 2))
    assert peer.fetch("orders.>", "term", "ORDERS", timeout=0.5) == []  # nats-py sees nothing either


@pytest.mark.timeout(20)
def test_in_progress_keeps_a_message_whose_handler_runs_past_the_ack_wait(js: JetStream, peer: Peer) -> None:
    """Two handlers busy for 2.5 ack waits: the one that says in_progress keeps its
    message; the one that does not sees it redelivered to another worker (the control)."""
    fill(peer, js, 2)
    deliveries: list[tuple[int, int]] = []
    lock = threading.Lock()

    def handler(msg: JsMsg) -> None:
        index = int(msg.data)
        with lock:
            deliveries.append((index, msg.metadata.num_delivered))
        if msg.metadata.num_delivered > 1:
            return
        for _ in range(10):
            time.sleep(0.25)
            if index == 0:
                msg.in_progress()

    with js.consume("orders.>", handler, "wpi", workers=3, ack_wait=1) as consumer:
        assert wait_until(lambda: consumer.processed >= 3, timeout=10)
    assert sorted(deliveries) == [(0, 1), (1, 1), (1, 2)]
    assert wait_until(lambda: settled(peer, "ORDERS", "wpi", 2))


@pytest.mark.timeout(20)
def test_a_handler_that_raises_gets_its_message_redelivered(js: JetStream, peer: Peer, nc: SyncNatsCluster) -> None:
    fill(peer, js, 3)
    calls: list[tuple[int, int]] = []

    def handler(msg: JsMsg) -> None:
        calls.append((int(msg.data), msg.metadata.num_delivered))
        if int(msg.data) == 1 and msg.metadata.num_delivered == 1:
            raise RuntimeError("first delivery fails")

    with js.consume("orders.>", handler, "raises", workers=1) as consumer:
        assert wait_until(lambda: consumer.processed == 3, timeout=10)
    assert sorted(calls) == [(0, 1), (1, 1), (1, 2), (2, 1)]
    assert (consumer.processed, consumer.failed) == (3, 1)
    assert nc.stats()["js_failed"] == 1 and nc.stats()["js_processed"] == 3
    assert wait_until(lambda: settled(peer, "ORDERS", "raises", 3))


@pytest.mark.timeout(20)
def test_max_deliver_bounds_the_deliveries(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 1)
    sub = js.pull_subscribe("orders.>", "bounded", ack_wait=1, max_deliver=3)
    delivered = []
    for _ in range(5):
        for m in sub.fetch(1, 1.5):
            delivered.append(m.metadata.num_delivered)
            m.nak()
    assert delivered == [1, 2, 3]
    assert sub.fetch(1, 1.5) == []  # nor after an ack wait


# -- the worker pool -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_pool_of_4_handles_2000_messages_exactly_once_while_first_deliveries_fail(
    js: JetStream, peer: Peer, nc: SyncNatsCluster
) -> None:
    n = 2000
    fill(peer, js, n)
    done: Counter[int] = Counter()
    failures: Counter[int] = Counter()
    lock = threading.Lock()

    def handler(msg: JsMsg) -> None:
        index = int(msg.data)
        if index % 7 == 0 and msg.metadata.num_delivered == 1:
            with lock:
                failures[index] += 1
            raise ValueError(f"first delivery of {index}")
        with lock:
            done[index] += 1

    consumer = js.consume("orders.>", handler, "pool", workers=4)
    try:
        assert wait_until(lambda: sum(done.values()) >= n, timeout=45)
        assert wait_until(lambda: settled(peer, "ORDERS", "pool", n))
    finally:
        consumer.stop(10)
    must_fail = len(range(0, n, 7))
    assert set(done) == set(range(n)) and set(done.values()) == {1}  # each handled successfully once
    assert set(failures) == set(range(0, n, 7)) and set(failures.values()) == {1}
    assert (consumer.processed, consumer.failed) == (n, must_fail)
    stats = nc.stats()
    assert (stats["js_processed"], stats["js_failed"], stats["js_ack_errors"]) == (n, must_fail, 0)
    assert peer.consumer_info("ORDERS", "pool").num_redelivered == 0
    assert not any(t.is_alive() for t in consumer.workers)


@pytest.mark.timeout(20)
def test_stop_lets_running_handlers_finish_and_acks_their_messages(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 20)
    started: list[int] = []
    finished: list[int] = []
    lock = threading.Lock()

    def handler(msg: JsMsg) -> None:
        with lock:
            started.append(int(msg.data))
        time.sleep(1.0)
        with lock:
            finished.append(int(msg.data))

    consumer = js.consume("orders.>", handler, "stopping", workers=3)
    assert wait_until(lambda: len(started) == 3)
    consumer.stop(5)
    assert sorted(finished) == sorted(started) and len(started) == 3  # they finished; no new one started
    assert not consumer.running and not any(t.is_alive() for t in consumer.workers)
    info = peer.consumer_info("ORDERS", "stopping")
    assert wait_until(lambda: peer.consumer_info("ORDERS", "stopping").num_ack_pending == 0), info
    info = peer.consumer_info("ORDERS", "stopping")
    assert info.ack_floor.stream_seq == 3 and info.num_pending == 17  # the rest waits on the server
    rest = peer.fetch("orders.>", "stopping", "ORDERS", batch=20, timeout=2)
    assert sorted(int(m.data) for m in rest) == sorted(set(range(20)) - set(started))


@pytest.mark.timeout(20)
def test_stop_that_runs_out_of_time_raises_and_the_handler_still_acks(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 1)
    running = threading.Event()

    def handler(msg: JsMsg) -> None:
        running.set()
        time.sleep(1.5)

    consumer = js.consume("orders.>", handler, "slowstop", workers=2)
    assert running.wait(5)
    started = time.monotonic()
    with pytest.raises(ClusterTimeoutError):
        consumer.stop(0.3)
    assert time.monotonic() - started < 0.3 + 1
    assert not consumer.running
    assert wait_until(lambda: not any(t.is_alive() for t in consumer.workers), timeout=5)
    assert consumer.processed == 1
    assert wait_until(lambda: settled(peer, "ORDERS", "slowstop", 1))  # acked when it finished
    consumer.stop(1)  # now all done: returns


@pytest.mark.timeout(20)
def test_stop_from_a_handler_does_not_deadlock(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 10)
    box: list[Any] = []
    returned = threading.Event()
    handled: list[int] = []

    made = threading.Event()

    def handler(msg: JsMsg) -> None:
        made.wait(5)  # consume() starts the workers before it returns the pool
        handled.append(int(msg.data))
        if int(msg.data) == 4:
            box[0].stop(3)
            returned.set()

    box.append(js.consume("orders.>", handler, "selfstop", workers=2))
    made.set()
    consumer = box[0]
    assert returned.wait(10)
    assert wait_until(lambda: not any(t.is_alive() for t in consumer.workers), timeout=5)
    assert not consumer.running and consumer.failed == 0
    # What was handled is acked; the rest (a message fetched while stopping was naked) is
    # on the server for the next consumer, once.
    rest = peer.fetch("orders.>", "selfstop", "ORDERS", batch=10, timeout=2)
    assert sorted(handled + [int(m.data) for m in rest]) == list(range(10))
    assert consumer.processed == len(handled)
    peer.ack(rest)
    assert wait_until(lambda: settled(peer, "ORDERS", "selfstop", 10))


# -- fetch -----------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_fetch_with_nothing_pending_returns_empty_after_its_timeout(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 0)
    sub = js.pull_subscribe("orders.>", "empty")
    for timeout in (0.3, 1.5):
        started = time.monotonic()
        assert sub.fetch(10, timeout) == []
        took = time.monotonic() - started
        assert timeout * 0.8 <= took < timeout + 2.0, took
    assert peer.consumer_info("ORDERS", "empty").num_waiting == 0  # nothing left lingering


@pytest.mark.timeout(20)
def test_a_lingering_fetch_gets_a_message_published_while_it_waits(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 0)
    sub = js.pull_subscribe("orders.>", "late")
    threading.Timer(0.5, lambda: peer.publish("orders.x", b"7")).start()
    [msg] = sub.fetch(10, 5)
    assert msg.data == b"7"
    msg.ack()


# -- metadata --------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_metadata_matches_what_nats_py_reports_for_the_same_message(js: JetStream, peer: Peer) -> None:
    js.add_stream("ORDERS", ["orders.>"])
    acks = [peer.publish(f"orders.{i}", b"m%d" % i, headers={"K": str(i)}) for i in range(4)]
    ours_sub = js.pull_subscribe("orders.>", "ours")
    peer.run(peer.js.add_consumer("ORDERS", durable_name="theirs", ack_policy="explicit"))
    ours = ours_sub.fetch(3, 2)
    theirs = peer.fetch("orders.>", "theirs", "ORDERS", batch=3, timeout=2)
    assert len(ours) == len(theirs) == 3
    for mine, other, ack in zip(ours, theirs, acks, strict=False):
        m, o = mine.metadata, other.metadata
        assert (m.stream, m.consumer) == ("ORDERS", "ours") and o.consumer == "theirs"
        assert m.sequence.stream == o.sequence.stream == ack.seq
        assert m.sequence.consumer == o.sequence.consumer
        assert (m.num_delivered, m.num_pending) == (o.num_delivered, o.num_pending)
        assert m.timestamp == o.timestamp
        assert (mine.subject, mine.data, dict(mine.headers or {})) == (other.subject, other.data, other.headers)
        mine.nak()
    # Redeliveries: the stream sequence stays, the consumer sequence moves on, the count grows.
    again: dict[int, Any] = {}
    deadline = time.monotonic() + 5
    while len(again) < 4 and time.monotonic() < deadline:
        again.update((m.metadata.sequence.stream, m.metadata) for m in ours_sub.fetch(4, 1))
    assert sorted(again) == [1, 2, 3, 4]
    assert [again[s].num_delivered for s in (1, 2, 3, 4)] == [2, 2, 2, 1]
    assert sorted(a.sequence.consumer for a in again.values()) == [4, 5, 6, 7]
    assert all(a.consumer == "ours" and a.stream == "ORDERS" for a in again.values())


# -- stream management -----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_stream_and_consumer_management_agree_with_nats_py(js: JetStream, peer: Peer) -> None:
    made = js.add_stream("FLEET", ["fleet.>", "trucks.*"], storage="memory", max_msgs=100, max_age=60)
    theirs = peer.stream_info("FLEET")
    assert made.name == theirs.config.name == "FLEET"
    assert theirs.config.subjects == ["fleet.>", "trucks.*"]
    assert theirs.config.storage == "memory" and theirs.config.max_msgs == 100
    assert theirs.config.max_age == 60.0  # nats-py reads ns as seconds
    assert js.add_stream("FLEET", ["fleet.>", "trucks.*"], storage="memory", max_msgs=100, max_age=60).name == "FLEET"
    with pytest.raises(JetStreamError):  # same name, another configuration
        js.add_stream("FLEET", ["other.>"], storage="file")
    with pytest.raises(JetStreamError):  # subjects another stream has
        js.add_stream("OVERLAP", ["fleet.a"])

    updated = js.update_stream("FLEET", max_msgs=50)
    theirs = peer.stream_info("FLEET")
    assert updated.config["max_msgs"] == theirs.config.max_msgs == 50
    assert theirs.config.subjects == ["fleet.>", "trucks.*"] and theirs.config.max_age == 60.0  # kept
    js.update_stream("FLEET", ["fleet.>"])
    assert peer.stream_info("FLEET").config.subjects == ["fleet.>"]
    with pytest.raises(StreamNotFoundError):
        js.update_stream("NOPE", max_msgs=1)

    for i in range(60):
        peer.publish(f"fleet.{i}", b"%d" % i)
    info, theirs = js.stream_info("FLEET"), peer.stream_info("FLEET")
    assert (info.messages, info.first_seq, info.last_seq) == (theirs.state.messages, theirs.state.first_seq, 60)
    assert info.messages == 50 and info.first_seq == 11 and info.bytes == theirs.state.bytes
    assert js.stream_for("fleet.7") == "FLEET"

    sub = js.pull_subscribe("fleet.>", "reader", ack_wait=5, max_deliver=4, max_ack_pending=10)
    [m] = sub.fetch(1, 2)
    m.ack_sync(5)
    mine, theirs_c = js.consumer_info("FLEET", "reader"), peer.consumer_info("FLEET", "reader")
    assert mine.name == theirs_c.name == "reader" and mine.stream == theirs_c.stream_name == "FLEET"
    assert (
        (mine.num_pending, mine.num_ack_pending, mine.ack_floor, mine.delivered)
        == (
            theirs_c.num_pending,
            theirs_c.num_ack_pending,
            theirs_c.ack_floor.stream_seq,
            theirs_c.delivered.stream_seq,
        )
        == (49, 0, 11, 11)
    )
    assert theirs_c.config.ack_wait == 5.0 and theirs_c.config.max_deliver == 4
    assert theirs_c.config.max_ack_pending == 10 and theirs_c.config.ack_policy == "explicit"
    assert info.consumer_count == 0 and js.stream_info("FLEET").consumer_count == 1

    # A stream made here, consumed with nats-py.
    got = peer.fetch("fleet.>", "reader", "FLEET", batch=3, timeout=2)
    assert [g.metadata.sequence.stream for g in got] == [12, 13, 14]
    peer.ack(got)

    js.delete_consumer("FLEET", "reader")
    with pytest.raises(nats.js.errors.NotFoundError):
        peer.consumer_info("FLEET", "reader")
    with pytest.raises(ConsumerNotFoundError):
        js.consumer_info("FLEET", "reader")
    with pytest.raises(ConsumerNotFoundError):
        js.delete_consumer("FLEET", "reader")
    js.delete_stream("FLEET")
    with pytest.raises(nats.js.errors.NotFoundError):
        peer.stream_info("FLEET")
    with pytest.raises(StreamNotFoundError):
        js.delete_stream("FLEET")
    with pytest.raises(StreamNotFoundError):
        js.consumer_info("FLEET", "reader")
    with pytest.raises(StreamNotFoundError):
        js.stream_for("fleet.7")


@pytest.mark.timeout(20)
def test_a_stream_made_with_nats_py_is_consumed_here(js: JetStream, peer: Peer) -> None:
    peer.run(peer.js.add_stream(name="THEIRS", subjects=["theirs.>"]))
    for i in range(5):
        peer.publish("theirs.x", b"%d" % i)
    with js.pull_subscribe("theirs.>") as sub:  # ephemeral
        msgs = sub.fetch(10, 2)
        assert [m.data for m in msgs] == [b"%d" % i for i in range(5)]
        for m in msgs:
            m.ack()
        assert [c.name for c in peer.run(peer.js.consumers_info("THEIRS"))] == [sub.consumer]
    assert peer.run(peer.js.consumers_info("THEIRS")) == []  # the ephemeral consumer went with it
