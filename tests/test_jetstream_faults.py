"""The blocking JetStream consume side under faults and errors: a SIGKILL and restart of
the server, a stopped (SIGSTOP) server, the cluster's close under a running pool, a pool
stopped while its workers fetch; missing streams and consumers, bad arguments, acks that
cannot be sent. Nothing may be lost, no call may hang past its timeout."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import nats.js.errors
import pytest

from openfactory_nats import (
    ClusterClosedError,
    ClusterTimeoutError,
    InvalidMessageError,
    InvalidTypeError,
    SyncNatsCluster,
)
from openfactory_nats._errors import (
    ConsumerNotFoundError,
    JetStreamError,
    MsgAlreadyAckedError,
    StreamNotFoundError,
)
from openfactory_nats._jetstream.handle import JetStream
from openfactory_nats._jetstream.msg import JsMsg

from .jspeer import Peer, wait_until
from .servers import NatsServer

pytestmark = pytest.mark.slow


@pytest.fixture
def nc(jetstream_server: NatsServer, logger: logging.Logger) -> Iterator[SyncNatsCluster]:
    with SyncNatsCluster("JS", [jetstream_server.url], logger, reconnect_time_wait=0.1, timeout=15.0) as cluster:
        yield cluster


@pytest.fixture
def js(nc: SyncNatsCluster) -> JetStream:
    return nc.jetstream()


def fill(peer: Peer, js: JetStream, n: int) -> None:
    js.add_stream("WORK", ["work.>"], storage="file")
    peer.publish_many([(f"work.{i % 3}", b"%d" % i) for i in range(n)])


def crash_and_restart(server: NatsServer, down: float = 0.5) -> None:
    server.kill()
    time.sleep(down)
    server.start()  # same port, same store directory


# -- SIGKILL and restart ---------------------------------------------------------------


@pytest.mark.timeout(40)
def test_a_durable_consumer_loses_nothing_across_a_server_crash(
    jetstream_server: NatsServer, js: JetStream, peer: Peer
) -> None:
    """100 messages: 40 acked (confirmed) before the crash, 20 fetched and left unacked, 40
    never fetched; after the restart the same subscription gets every message not acked,
    and the consumer ends with everything acked. nats-server does not write a consumer's
    acks to disk at once: after a SIGKILL it may deliver acked messages again (nats-py's
    acks alike), so the acked-before may come again; the others must come, once."""
    n = 100
    fill(peer, js, n)
    sub = js.pull_subscribe("work.>", "durable", ack_wait=2)
    acked: list[int] = []
    for m in sub.fetch(40, 5):
        m.ack_sync(5)
        acked.append(int(m.data))
    unacked = [int(m.data) for m in sub.fetch(20, 5)]
    assert (len(acked), len(unacked)) == (40, 20)

    crash_and_restart(jetstream_server)

    got: list[int] = []

    def done() -> bool:
        return peer.consumer_info("WORK", "durable").ack_floor.stream_seq == n

    deadline = time.monotonic() + 25
    while time.monotonic() < deadline and not (set(range(40, n)) <= set(got) and done()):
        for m in sub.fetch(25, 1):
            got.append(int(m.data))
            m.ack_sync(5)
    assert set(acked + got) == set(range(n))  # nothing lost
    assert sorted(set(got) - set(acked)) == list(range(40, n))  # the unacked, all there
    assert len(got) == len(set(got))  # after the restart, each once
    assert done() and peer.consumer_info("WORK", "durable").num_ack_pending == 0
    assert sub.fetch(n, 0.5) == []


@pytest.mark.timeout(40)
def test_a_fetch_waiting_while_the_server_restarts_gets_messages_after_the_reconnection(
    jetstream_server: NatsServer, js: JetStream, peer: Peer, nc: SyncNatsCluster
) -> None:
    fill(peer, js, 0)
    sub = js.pull_subscribe("work.>", "waiting")
    result: list[Any] = []

    def fetch() -> None:
        started = time.monotonic()
        try:
            result.append(sub.fetch(5, 12))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            result.append(exc)
        result.append(time.monotonic() - started)

    t = threading.Thread(target=fetch)
    t.start()
    time.sleep(0.5)  # the fetch lingers on the server
    crash_and_restart(jetstream_server)
    assert wait_until(lambda: nc.stats()["reconnects"] >= 1, timeout=10)
    time.sleep(0.3)
    for i in range(3):
        peer.publish(f"work.{i}", b"%d" % i)
    t.join(20)
    assert not t.is_alive()
    msgs, took = result
    assert isinstance(msgs, list) and [m.data for m in msgs][:1] == [b"0"], result
    assert took < 12 + 2
    for m in msgs:
        m.ack_sync(5)
    rest = sub.fetch(5, 2)
    assert sorted(m.data for m in msgs + rest) == [b"0", b"1", b"2"]


@pytest.mark.timeout(50)
def test_a_pool_keeps_working_across_a_server_crash(
    jetstream_server: NatsServer, js: JetStream, peer: Peer, nc: SyncNatsCluster
) -> None:
    n = 600
    fill(peer, js, n)
    handled: list[int] = []
    lock = threading.Lock()

    def handler(msg: JsMsg) -> None:
        time.sleep(0.002)
        with lock:
            handled.append(int(msg.data))

    with js.consume("work.>", handler, "crashpool", workers=4, ack_wait=2) as consumer:
        assert wait_until(lambda: len(handled) > 150, timeout=20)
        crash_and_restart(jetstream_server)
        before = len(handled)
        assert wait_until(lambda: set(handled) == set(range(n)), timeout=30), len(set(handled))
        assert wait_until(lambda: peer.consumer_info("WORK", "crashpool").ack_floor.stream_seq == n, timeout=10), (
            peer.consumer_info("WORK", "crashpool")
        )
    # At least once: an ack the crash lost (the server may restore an older consumer state)
    # means a second delivery of a message handled before it, never a missing one.
    assert consumer.failed == 0 and consumer.processed == len(handled)
    assert len(handled) - n <= before, (len(handled), before)


# -- a stopped server ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_fetch_and_ack_sync_keep_their_timeouts_while_the_server_is_stopped(
    jetstream_server: NatsServer, js: JetStream, peer: Peer
) -> None:
    fill(peer, js, 2)
    sub = js.pull_subscribe("work.>", "frozen")
    [held] = sub.fetch(1, 2)
    jetstream_server.pause()
    try:
        started = time.monotonic()
        assert sub.fetch(1, 1.5) == []  # no hang
        assert time.monotonic() - started < 1.5 + 2
        started = time.monotonic()
        with pytest.raises(ClusterTimeoutError):
            held.ack_sync(1.0)
        assert time.monotonic() - started < 1.0 + 2
        assert not held.acked  # it can be acknowledged again
    finally:
        jetstream_server.resume()
    held.ack_sync(10)
    [second] = sub.fetch(1, 10)
    assert second.data == b"1"
    second.ack_sync(5)
    assert wait_until(lambda: peer.consumer_info("WORK", "frozen").ack_floor.stream_seq == 2)


@pytest.mark.timeout(30)
def test_a_fetch_already_waiting_when_the_server_stops_returns_within_its_timeout(
    jetstream_server: NatsServer, js: JetStream, peer: Peer
) -> None:
    fill(peer, js, 0)
    sub = js.pull_subscribe("work.>", "stalled")
    result: list[Any] = []

    def fetch() -> None:
        started = time.monotonic()
        result.append(sub.fetch(3, 2.0))
        result.append(time.monotonic() - started)

    t = threading.Thread(target=fetch)
    t.start()
    time.sleep(0.3)
    jetstream_server.pause()
    try:
        t.join(10)
        assert not t.is_alive()
    finally:
        jetstream_server.resume()
    assert result[0] == [] and result[1] < 2.0 + 2


# -- ending a pool ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_closing_the_cluster_ends_a_running_pool_without_hanging(
    jetstream_server: NatsServer, peer: Peer, logger: logging.Logger
) -> None:
    cluster = SyncNatsCluster("JS", [jetstream_server.url], logger, reconnect_time_wait=0.1)
    js = cluster.jetstream()
    fill(peer, js, 5)
    busy = threading.Event()
    release = threading.Event()

    def handler(msg: JsMsg) -> None:
        if int(msg.data) == 0:
            busy.set()
            release.wait(10)

    consumer = js.consume("work.>", handler, "closing", workers=3, ack_wait=1)
    assert busy.wait(5)
    assert wait_until(lambda: consumer.processed == 4)  # the others, done; their workers idle in a fetch
    started = time.monotonic()
    cluster.close(5)
    assert time.monotonic() - started < 5 + 2
    release.set()  # the busy handler returns; its ack cannot be sent any more
    assert wait_until(lambda: not any(t.is_alive() for t in consumer.workers), timeout=5)
    assert not consumer.running
    consumer.stop(1)  # idempotent after the close
    assert cluster.stats()["js_ack_errors"] == 1  # the busy handler's ack, counted
    info = peer.consumer_info("WORK", "closing")
    assert (info.num_pending, info.num_ack_pending) == (0, 1), info  # 1-4 acked
    [again] = peer.fetch("work.>", "closing", "WORK", timeout=5)  # 0 comes back after its ack wait
    assert again.data == b"0" and again.metadata.num_delivered == 2
    peer.ack([again])


@pytest.mark.timeout(30)
def test_stopping_a_pool_while_its_workers_fetch_strands_no_message(js: JetStream, peer: Peer) -> None:
    """Workers with quick handlers are always fetching; stop() may not leave a message
    delivered to this process and neither handled nor given back (it would wait for the
    ack wait, 30 s here, before anyone got it)."""
    n = 1000
    fill(peer, js, n)
    handled: list[int] = []
    lock = threading.Lock()

    def handler(msg: JsMsg) -> None:
        time.sleep(0.002)
        with lock:
            handled.append(int(msg.data))

    for _ in range(3):
        goal = len(handled) + 30
        consumer = js.consume("work.>", handler, "quick", workers=4)
        assert wait_until(lambda g=goal: len(handled) >= g, timeout=10)  # type: ignore[misc]
        consumer.stop(5)
    assert len(handled) < n
    info = peer.consumer_info("WORK", "quick")
    rest = peer.fetch("work.>", "quick", "WORK", batch=n, timeout=2)
    assert sorted(handled + [int(m.data) for m in rest]) == list(range(n)), (
        f"stranded: {sorted(set(range(n)) - set(handled) - {int(m.data) for m in rest})}; {info}"
    )


# -- errors ----------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_a_missing_stream_raises_stream_not_found_at_once(js: JetStream) -> None:
    for kwargs in ({}, {"stream": "NOPE"}):
        started = time.monotonic()
        with pytest.raises(StreamNotFoundError):
            js.pull_subscribe("nowhere.>", "d", timeout=8, **kwargs)
        assert time.monotonic() - started < 4
    with pytest.raises(StreamNotFoundError):
        js.stream_info("NOPE")


@pytest.mark.timeout(20)
def test_a_deleted_consumer_makes_fetch_raise_consumer_not_found_at_once(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 0)
    sub = js.pull_subscribe("work.>", "gone")
    peer.run(peer.js.delete_consumer("WORK", "gone"))
    started = time.monotonic()
    with pytest.raises(ConsumerNotFoundError):
        sub.fetch(1, 8)
    assert time.monotonic() - started < 4


@pytest.mark.timeout(20)
def test_a_consumer_deleted_during_a_lingering_fetch_ends_it_with_consumer_not_found(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 0)
    sub = js.pull_subscribe("work.>", "dying")
    outcome: list[Any] = []

    def fetch() -> None:
        started = time.monotonic()
        try:
            outcome.append(sub.fetch(1, 8))
        except JetStreamError as exc:
            outcome.append(exc)
        outcome.append(time.monotonic() - started)

    t = threading.Thread(target=fetch)
    t.start()
    time.sleep(0.5)
    peer.run(peer.js.delete_consumer("WORK", "dying"))
    t.join(15)
    assert isinstance(outcome[0], ConsumerNotFoundError), outcome
    assert outcome[1] < 5


@pytest.mark.timeout(20)
def test_a_deleted_stream_makes_fetch_raise_at_once(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 1)
    sub = js.pull_subscribe("work.>", "orphan")
    js.delete_stream("WORK")
    started = time.monotonic()
    with pytest.raises((StreamNotFoundError, ConsumerNotFoundError)):
        sub.fetch(1, 8)
    assert time.monotonic() - started < 4


def _bad_calls(js: JetStream, sub: Any) -> list[tuple[type[Exception], Any]]:
    def handler(msg: JsMsg) -> None:
        pass

    return [
        (InvalidMessageError, lambda: sub.fetch(0, 1)),
        (InvalidTypeError, lambda: sub.fetch("x", 1)),
        (InvalidMessageError, lambda: sub.fetch(1, -1)),
        (InvalidMessageError, lambda: js.pull_subscribe("work.>", "bad.name")),
        (InvalidMessageError, lambda: js.pull_subscribe("work.>", "bad name")),
        (InvalidMessageError, lambda: js.pull_subscribe("work.>", "")),
        (InvalidTypeError, lambda: js.pull_subscribe("work.>", 7)),
        (InvalidMessageError, lambda: js.pull_subscribe("work.>", "d", deliver_policy="sometimes")),
        (InvalidMessageError, lambda: js.pull_subscribe("work.>", "d", deliver_policy="by_start_sequence")),
        (InvalidMessageError, lambda: js.pull_subscribe("work.>", "d", ack_wait=-1)),
        (InvalidMessageError, lambda: js.pull_subscribe("work.>", "d", ack_wait=0)),
        (InvalidTypeError, lambda: js.pull_subscribe("work.>", "d", ack_wait="1")),
        (InvalidMessageError, lambda: js.pull_subscribe("work.>", "d", max_deliver=0)),
        (InvalidMessageError, lambda: js.pull_subscribe("work..x", "d")),
        (InvalidTypeError, lambda: js.consume("work.>", "not callable", "d")),  # type: ignore[arg-type]
        (InvalidMessageError, lambda: js.consume("work.>", handler, "d", workers=0)),
        (InvalidMessageError, lambda: js.add_stream("BAD.NAME", ["bad.>"])),
        (InvalidMessageError, lambda: js.add_stream("BAD", ["bad.>"], storage="tape")),
        (InvalidTypeError, lambda: js.add_stream("BAD", "bad.>")),  # type: ignore[arg-type]
        (InvalidMessageError, lambda: js.add_stream("BAD", ["bad.>"], max_age=-5)),
        (InvalidMessageError, lambda: js.stream_info("a b")),
    ]


@pytest.mark.timeout(30)
def test_bad_arguments_raise_in_the_caller_and_leave_the_cluster_working(
    js: JetStream, peer: Peer, nc: SyncNatsCluster
) -> None:
    fill(peer, js, 3)
    sub = js.pull_subscribe("work.>", "good")
    for kind, call in _bad_calls(js, sub):
        with pytest.raises(kind):
            call()
    [msg] = sub.fetch(1, 2)
    with pytest.raises(InvalidMessageError):
        msg.nak(delay=-1)
    assert not msg.acked  # a refused nak did not use the message's one acknowledgement
    msg.ack_sync(5)
    assert [m.data for m in sub.fetch(2, 2)] == [b"1", b"2"]
    assert [c.name for c in peer.run(peer.js.consumers_info("WORK"))] == ["good"]  # nothing half-made
    with pytest.raises(nats.js.errors.NotFoundError):
        peer.stream_info("BAD")
    assert nc.request("$JS.API.INFO", b"", 5).data  # the connection is fine


@pytest.mark.timeout(20)
def test_acknowledging_twice_raises_msg_already_acked(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 3)
    sub = js.pull_subscribe("work.>", "twice")
    acked, naked, termed = sub.fetch(3, 2)
    acked.ack()
    naked.nak()
    termed.term()
    for msg in (acked, naked, termed):
        assert msg.acked
        for second in (msg.ack, msg.nak, msg.term, msg.in_progress, lambda m=msg: m.ack_sync(1)):
            with pytest.raises(MsgAlreadyAckedError):
                second()
    [synced] = sub.fetch(1, 2)  # the naked one, again
    synced.ack_sync(5)
    with pytest.raises(MsgAlreadyAckedError):
        synced.ack()


@pytest.mark.timeout(30)
def test_acking_after_close_raises_cluster_closed_counts_it_and_the_message_comes_back(
    jetstream_server: NatsServer, peer: Peer, logger: logging.Logger
) -> None:
    cluster = SyncNatsCluster("JS", [jetstream_server.url], logger, reconnect_time_wait=0.1)
    js = cluster.jetstream()
    fill(peer, js, 1)
    sub = js.pull_subscribe("work.>", "closed", ack_wait=1)
    [msg] = sub.fetch(1, 2)
    cluster.close()
    with pytest.raises(ClusterClosedError):
        msg.ack()
    with pytest.raises(ClusterClosedError):
        msg.ack_sync(1)
    assert not msg.acked
    assert cluster.stats()["js_ack_errors"] == 2
    [again] = peer.fetch("work.>", "closed", "WORK", timeout=5)  # the server redelivers it
    assert again.data == b"0" and again.metadata.num_delivered == 2
    peer.ack([again])


@pytest.mark.timeout(20)
def test_concurrent_acknowledgements_of_one_message_let_exactly_one_through(js: JetStream, peer: Peer) -> None:
    fill(peer, js, 1)
    sub = js.pull_subscribe("work.>", "race")
    [msg] = sub.fetch(1, 2)
    outcomes: list[str] = []
    lock = threading.Lock()
    gate = threading.Barrier(8)

    def settle(i: int) -> None:
        gate.wait(5)
        try:
            (msg.ack, msg.nak, msg.term, msg.ack)[i % 4]()
            result = "ok"
        except MsgAlreadyAckedError:
            result = "already"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=settle, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(outcomes) == ["already"] * 7 + ["ok"]


@pytest.mark.timeout(20)
def test_ack_sync_of_a_message_whose_consumer_is_gone_raises_at_once(
    js: JetStream, peer: Peer, nc: SyncNatsCluster
) -> None:
    fill(peer, js, 1)
    sub = js.pull_subscribe("work.>", "vanishing")
    [msg] = sub.fetch(1, 2)
    js.delete_consumer("WORK", "vanishing")
    started = time.monotonic()
    with pytest.raises(ConsumerNotFoundError):  # nobody confirms it: the consumer is gone
        msg.ack_sync(8)
    assert time.monotonic() - started < 4
    assert not msg.acked and nc.stats()["js_ack_errors"] == 1


@pytest.mark.timeout(20)
def test_jetstream_calls_on_a_server_without_jetstream_raise_jetstream_error_at_once(
    server: NatsServer, logger: logging.Logger
) -> None:
    with SyncNatsCluster("plain", [server.url], logger) as plain:
        js = plain.jetstream()
        for call in (
            lambda: js.add_stream("S", ["s.>"], timeout=8),
            lambda: js.pull_subscribe("s.>", "d", timeout=8),
            lambda: js.pull_subscribe("s.>", "d", stream="S", timeout=8),
            lambda: js.stream_info("S", timeout=8),
        ):
            started = time.monotonic()
            with pytest.raises(JetStreamError) as caught:
                call()
            assert caught.value.code == 503
            assert time.monotonic() - started < 4
        plain.publish("still.fine", b"x")
        plain.flush(5)


@pytest.mark.timeout(20)
def test_a_fetch_held_back_by_max_ack_pending_leaves_no_request_on_the_server(js: JetStream, peer: Peer) -> None:
    """10 stored, max_ack_pending 5: a fetch of 10 gets 5. After it returned, no request of
    it may wait on the server: else, once the 5 are acked, the server sends 5 more to an
    inbox nobody reads, and their ack wait runs there ("nothing is fetched for nobody")."""
    fill(peer, js, 10)
    sub = js.pull_subscribe("work.>", "capped", max_ack_pending=5)
    got = sub.fetch(10, 1)
    assert len(got) == 5
    assert peer.consumer_info("WORK", "capped").num_waiting == 0
    for m in got:
        m.ack_sync(5)
    time.sleep(0.5)
    info = peer.consumer_info("WORK", "capped")
    assert (sub.pending, info.num_ack_pending, info.num_pending) == (0, 0, 5), info
