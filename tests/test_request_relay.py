"""How waiting threads are woken: answered requesters one after the other (the relay),
requests queued during a relay sent when it ends, serve workers woken when requests wait,
and reply subjects validated but not cached.

The relay's bookkeeping is pure logic and is tested on :class:`Replies` directly; what
involves the server is tested against a real one."""

from __future__ import annotations

import gc
import logging
import threading
import time

import pytest

from openfactory_nats import (
    ClusterClosedError,
    ClusterTimeoutError,
    InvalidMessageError,
    Msg,
    NoRespondersError,
    SyncNatsCluster,
    _wire,
)
from openfactory_nats._receive.inbox import Inbox
from openfactory_nats._receive.replies import Replies, Waiter
from openfactory_nats._send.outbox import Outbox

from .servers import NatsServer


def answer(replies: Replies, *waiters: Waiter) -> None:
    """What the event loop does when the replies of *waiters* arrive."""
    for waiter in waiters:
        replies.deliver(waiter.reply, b"", b"re:" + waiter.token, None)


@pytest.mark.timeout(10)
def test_answered_threads_are_woken_one_after_the_other() -> None:
    replies = Replies("c")
    ends: list[int] = []
    replies.on_relay_end = lambda: ends.append(1)
    a, b, c = (replies.expect() for _ in range(3))
    answer(replies, a, b, c)
    assert a.wait(0) and not b.wait(0) and not c.wait(0)  # only the first is woken
    assert replies.relaying()
    replies.forget(a)  # a leaves: b's turn
    assert b.wait(0) and not c.wait(0)
    assert b.msg is not None and b.msg.data == b"re:" + b.token
    replies.forget(b)
    assert c.wait(0) and ends == []
    replies.forget(c)
    assert ends == [1] and not replies.relaying()


@pytest.mark.timeout(10)
def test_a_caller_that_gives_up_while_queued_does_not_stall_the_relay() -> None:
    replies = Replies("c")
    ends: list[int] = []
    replies.on_relay_end = lambda: ends.append(1)
    a, b, c = (replies.expect() for _ in range(3))
    answer(replies, a, b, c)
    replies.forget(b)  # b timed out while its answer waited for its turn
    assert not b.wait(0)
    replies.forget(a)  # b is skipped: c's turn
    assert c.wait(0)
    replies.forget(c)
    assert ends == [1] and not replies.relaying()


@pytest.mark.timeout(10)
def test_a_reply_for_a_caller_that_gave_up_is_dropped_and_counted() -> None:
    replies = Replies("c")
    a, b = replies.expect(), replies.expect()
    replies.forget(a)
    answer(replies, a, b)
    assert replies.late == 1
    assert a.msg is None and b.wait(0)


@pytest.mark.timeout(10)
def test_closing_wakes_the_answered_callers_still_waiting_for_their_turn() -> None:
    replies = Replies("c")
    a, b, c = (replies.expect() for _ in range(3))
    answer(replies, a, b)
    assert a.wait(0) and not b.wait(0)
    replies.fail_all(ClusterClosedError("closed", cluster="c"))
    assert b.wait(0) and b.msg is not None and b.error is None  # answered: keeps its reply
    assert c.wait(0) and isinstance(c.error, ClusterClosedError)
    with pytest.raises(ClusterClosedError):
        replies.expect()


@pytest.mark.timeout(10)
def test_requests_queued_during_a_relay_are_sent_when_it_ends() -> None:
    woken: list[int] = []
    outbox: Outbox[bytes] = Outbox(1 << 20, lambda: woken.append(1), "c")
    replies = Replies("c")
    replies.on_relay_end = outbox.kick
    a, b = replies.expect(), replies.expect()
    answer(replies, a, b)
    replies.forget(a)  # a asks again at once, while b is being woken
    assert replies.relaying()
    outbox.put(b"PUB x 0\r\n\r\n", 11, 0.0, wake=False)  # as offer_request queues a request
    assert replies.relaying() and woken == []
    replies.forget(b)  # b asks nothing more: the relay's end sends a's request
    assert woken == [1]
    assert outbox.take() == [b"PUB x 0\r\n\r\n"]


@pytest.mark.timeout(60)
def test_requesters_that_give_up_do_not_hold_up_the_others(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    def handler(msg: Msg) -> bytes:
        if msg.data == b"slow":
            time.sleep(0.05)
        return b"re:" + msg.data

    service.serve("relay.mixed", handler, workers=4)
    errors: list[BaseException] = []
    timeouts = [0]

    def work(i: int) -> None:
        try:
            for n in range(150):
                if i == 0 and n % 10 == 0:
                    try:
                        client.request("relay.mixed", b"slow", timeout=0.01)
                    except TimeoutError:
                        timeouts[0] += 1
                    continue
                payload = b"%d.%d" % (i, n)
                assert client.request("relay.mixed", payload, timeout=10).data == b"re:" + payload
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
        assert not thread.is_alive()
    assert errors == []
    assert timeouts[0] == 15
    deadline = time.monotonic() + 5
    while client.stats()["late_replies"] < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.stats()["late_replies"] == 15


@pytest.mark.timeout(10)
def test_lazy_readers_outside_an_event_loop_are_all_woken() -> None:
    inbox = Inbox("c", "s", logging.getLogger("test"))
    inbox.wake_lazily(60.0)  # a look scheduled that late would fail the test
    got: list[Msg] = []
    barrier = threading.Barrier(2, timeout=5)

    def read() -> None:
        got.append(inbox.next_msg(timeout=5))
        barrier.wait()  # both readers hold a message at once

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 5
    while inbox._readers.idle < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    inbox.offer([Msg("s", b"1"), Msg("s", b"2")])  # no event loop runs in this thread
    for reader in readers:
        reader.join(5)
        assert not reader.is_alive()
    assert sorted(m.data for m in got) == [b"1", b"2"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("public_api", [False, True], ids=["fast", "public-api"])
def test_reply_subjects_are_not_cached(
    server: NatsServer, logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, public_api: bool
) -> None:
    if public_api:
        monkeypatch.setenv("OPENFACTORY_NATS_PUBLIC_API", "1")
    else:
        monkeypatch.delenv("OPENFACTORY_NATS_PUBLIC_API", raising=False)
    with (
        SyncNatsCluster("service", [server.url], logger) as service,
        SyncNatsCluster("client", [server.url], logger) as client,
    ):
        assert service.cluster._fast is not public_api
        reply_subjects_are_not_cached(service, client)


def reply_subjects_are_not_cached(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    _wire._subject_cache.clear()
    service.serve("relay.cache", lambda msg: b"re:" + msg.data)
    for i in range(50):
        assert client.request("relay.cache", b"%d" % i).data == b"re:%d" % i
    assert not [s for s in _wire._subject_cache if s.startswith("_INBOX.")]


@pytest.mark.timeout(30)
def test_a_reply_subject_the_server_cannot_have_sent_is_refused(server: NatsServer, client: SyncNatsCluster) -> None:
    client.connect()
    forged = Msg("x", b"", reply="has space", responder=client.cluster.respond)
    with pytest.raises(InvalidMessageError):
        forged.respond(b"data")
    forged = Msg("x", b"", reply="line\r\nPUB y 0", responder=client.cluster.respond)
    with pytest.raises(InvalidMessageError):
        forged.respond(b"data")
    assert client.is_connected
    client.flush()


@pytest.mark.timeout(60)
def test_a_serving_instance_dropped_without_close_stops_its_workers(
    server: NatsServer, logger: logging.Logger, client: SyncNatsCluster
) -> None:
    def serve_and_drop() -> list[threading.Thread]:
        service = SyncNatsCluster("dropped", [server.url], logger)
        service.serve("relay.dropped", lambda msg: b"ok", workers=2)
        assert client.request("relay.dropped", b"", timeout=5).data == b"ok"
        return [t for t in threading.enumerate() if "serve-relay.dropped" in t.name]

    workers = serve_and_drop()
    assert len(workers) == 2
    gc.collect()
    for worker in workers:
        worker.join(10)
        assert not worker.is_alive()
    with pytest.raises((NoRespondersError, ClusterTimeoutError)):
        client.request("relay.dropped", b"", timeout=2)
