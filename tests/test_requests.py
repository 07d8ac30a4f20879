"""Request/reply against real nats-server processes: ``request``, ``serve`` and ``respond``."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from openfactory_nats import (
    ClusterClosedError,
    ClusterTimeoutError,
    InvalidMessageError,
    InvalidTypeError,
    Msg,
    NatsCluster,
    NatsClusterError,
    NoRespondersError,
    ServiceError,
    SyncNatsCluster,
    WrongThreadError,
)

from .servers import NatsServer


def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def echo(msg: Msg) -> bytes:
    return b"re:" + msg.data


def run_threads(count: int, target: Callable[[int], None], timeout: float = 30) -> None:
    """Run *target(i)* on *count* threads; re-raise the first failure here."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a requesting thread did not finish"
    if errors:
        raise errors[0]


@pytest.mark.timeout(30)
def test_eight_threads_each_get_their_own_replies(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    service.serve("svc.echo", echo, workers=4)
    replies: dict[int, list[bytes]] = {}

    def requester(t: int) -> None:
        replies[t] = [client.request("svc.echo", b"%d-%d" % (t, i)).data for i in range(200)]

    run_threads(8, requester)
    for t in range(8):
        assert replies[t] == [b"re:%d-%d" % (t, i) for i in range(200)]
    stats = client.stats()
    assert stats["requests"] == 1600 and stats["late_replies"] == 0


@pytest.mark.timeout(30)
def test_no_responders_is_raised_at_once(client: SyncNatsCluster) -> None:
    started = time.monotonic()
    with pytest.raises(NoRespondersError, match="no responders on 'nobody.home'") as info:
        client.request("nobody.home", b"x", timeout=10)
    assert time.monotonic() - started < 2
    assert isinstance(info.value, NatsClusterError) and info.value.cluster == "client"
    assert client.stats()["late_replies"] == 0


@pytest.mark.timeout(30)
def test_timeout_then_the_late_reply_is_dropped_and_counted(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    release = threading.Event()
    answered = threading.Event()

    def slow(msg: Msg) -> bytes:
        if msg.data == b"slow":
            release.wait(10)
            answered.set()
        return b"re:" + msg.data

    service.serve("svc.slow", slow, workers=2)
    started = time.monotonic()
    with pytest.raises(ClusterTimeoutError, match="no reply to 'svc.slow' within 0.3 s") as info:
        client.request("svc.slow", b"slow", timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 2
    assert isinstance(info.value, TimeoutError)
    release.set()
    assert answered.wait(5)
    wait_until(lambda: client.stats()["late_replies"] == 1)
    assert client.request("svc.slow", b"next", timeout=5).data == b"re:next"
    assert client.stats()["late_replies"] == 1


@pytest.mark.timeout(30)
def test_handler_errors_become_service_errors(
    service: SyncNatsCluster, client: SyncNatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(msg: Msg) -> Any:
        if msg.data == b"raise":
            raise ValueError("bad sensor 7")
        if msg.data == b"text":
            return "a str, not bytes"
        if msg.data == b"404":
            return b"", {"Nats-Service-Error": "no such asset", "Nats-Service-Error-Code": "404"}
        return b"fine"

    service.serve("svc.err", handler)
    started = time.monotonic()
    with pytest.raises(ServiceError) as info:
        client.request("svc.err", b"raise", timeout=10)
    assert time.monotonic() - started < 2  # answered at once, not after the timeout
    assert info.value.code == 500 and info.value.description == "ValueError: bad sensor 7"
    assert "bad sensor 7" in str(info.value) and info.value.cluster == "client"
    assert "the handler raised" in caplog.text and "Traceback" in caplog.text

    with pytest.raises(ServiceError) as info:
        client.request("svc.err", b"text", timeout=10)
    assert info.value.code == 500
    assert info.value.description.startswith("InvalidTypeError: a handler returns bytes or (bytes, headers), not str")

    with pytest.raises(ServiceError) as info:
        client.request("svc.err", b"404", timeout=10)
    assert (info.value.code, info.value.description) == (404, "no such asset")

    assert client.request("svc.err", b"ok").data == b"fine"  # the workers carry on


@pytest.mark.timeout(30)
def test_workers_run_handlers_concurrently(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    barrier = threading.Barrier(4, timeout=10)
    names: list[str] = []

    def handler(msg: Msg) -> bytes:
        barrier.wait()  # passes only when four handlers run at once
        name = threading.current_thread().name
        names.append(name)
        return name.encode()

    service.serve("svc.par", handler, workers=4)
    run_threads(4, lambda i: client.request("svc.par", b"%d" % i, timeout=15) and None)
    assert len(set(names)) == 4
    assert all(name.startswith("openfactory-nats-service-serve-svc.par") for name in names)
    assert threading.main_thread().name not in names


@pytest.mark.timeout(30)
def test_the_subscription_owns_its_serving_threads(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    plain = service.subscribe("svc.plain")
    assert plain.workers == ()
    sub = service.serve("svc.own", lambda msg: b"ok", workers=3)
    assert len(sub.workers) == 3 and all(t.is_alive() and t.daemon for t in sub.workers)
    assert {t.name for t in sub.workers} == {f"openfactory-nats-service-serve-svc.own-{i}" for i in range(3)}
    assert client.request("svc.own", b"x").data == b"ok"
    sub.unsubscribe(timeout=5)
    assert not any(t.is_alive() for t in sub.workers)  # joined by unsubscribe
    with pytest.raises(NoRespondersError):
        client.request("svc.own", b"x", timeout=5)


@pytest.mark.timeout(30)
def test_a_queue_group_spreads_requests_over_two_services(
    server: NatsServer, logger: logging.Logger, client: SyncNatsCluster
) -> None:
    with (
        SyncNatsCluster("A", [server.url], logger) as a,
        SyncNatsCluster("B", [server.url], logger) as b,
    ):
        a.serve("svc.q", lambda msg: b"A", queue="workers", workers=2)
        b.serve("svc.q", lambda msg: b"B", queue="workers", workers=2)
        got = [client.request("svc.q", b"%d" % i).data for i in range(200)]
    assert len(got) == 200 and set(got) == {b"A", b"B"}
    assert got.count(b"A") > 20 and got.count(b"B") > 20  # spread, not all to one
    assert client.stats()["late_replies"] == 0  # each request answered once


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_request_waits_through_a_short_outage(server: NatsServer, logger: logging.Logger) -> None:
    # The service reconnects faster than the client (0.1 s against 2 s between attempts),
    # so that it has subscribed again by the time the client's request reaches the server.
    with (
        SyncNatsCluster("service", [server.url], logger, reconnect_time_wait=0.1) as service,
        SyncNatsCluster("client", [server.url], logger, reconnect_time_wait=2) as client,
    ):
        service.serve("svc.outage", echo)
        assert client.request("svc.outage", b"before").data == b"re:before"
        server.kill()
        wait_until(lambda: not client.is_connected and not service.is_connected)
        outcome: list[Any] = []

        def requester() -> None:
            try:
                outcome.append(client.request("svc.outage", b"during", timeout=10))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=requester)
        thread.start()
        time.sleep(0.5)
        assert not outcome  # still waiting while the server is down
        server.start()
        thread.join(15)
        assert not thread.is_alive()
        (reply,) = outcome
        assert isinstance(reply, Msg), reply
        assert reply.data == b"re:during"
        assert client.request("svc.outage", b"after").data == b"re:after"


@pytest.mark.timeout(30)
def test_requests_from_inside_subscription_callbacks(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    service.serve("svc.cb", echo, workers=2)
    got: list[bytes] = []
    done = threading.Event()

    def on_message(msg: Msg) -> None:
        got.append(client.request("svc.cb", msg.data, timeout=5).data)
        if len(got) == 40:
            done.set()

    client.subscribe("events", on_message)
    dispatcher = client.dispatcher(threads=2)
    client.subscribe("events.shared", on_message, dispatcher=dispatcher)
    for i in range(20):
        client.publish("events", b"own-%d" % i)
        client.publish("events.shared", b"shared-%d" % i)
    assert done.wait(20)
    assert sorted(got) == sorted([b"re:own-%d" % i for i in range(20)] + [b"re:shared-%d" % i for i in range(20)])
    assert client.stats()["callback_errors"] == 0


@pytest.mark.timeout(60)
def test_requests_in_a_forked_child_through_the_parents_instance(
    service: SyncNatsCluster, client: SyncNatsCluster
) -> None:
    service.serve("svc.fork", echo, workers=2)
    assert client.request("svc.fork", b"parent").data == b"re:parent"
    pid = os.fork()
    if pid == 0:  # the child: any failure becomes a non-zero exit status
        code = 1
        try:
            replies = [client.request("svc.fork", b"child-%d" % i, timeout=5).data for i in range(20)]
            code = 0 if replies == [b"re:child-%d" % i for i in range(20)] else 2
            client.close()
        finally:
            os._exit(code)
    parent = [client.request("svc.fork", b"p-%d" % i).data for i in range(20)]
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert parent == [b"re:p-%d" % i for i in range(20)]
    assert client.request("svc.fork", b"after").data == b"re:after"
    assert client.stats()["late_replies"] == 0


@pytest.mark.timeout(30)
def test_close_ends_the_requests_waiting_for_a_reply(server: NatsServer, logger: logging.Logger) -> None:
    nats = SyncNatsCluster("client", [server.url], logger)
    sink = nats.subscribe("svc.never")  # receives the requests, never answers
    outcomes: list[tuple[BaseException | None, float]] = []

    def requester(i: int) -> None:
        try:
            nats.request("svc.never", b"%d" % i, timeout=30)
            outcomes.append((None, time.monotonic()))
        except BaseException as exc:
            outcomes.append((exc, time.monotonic()))

    threads = [threading.Thread(target=requester, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: sink.pending == 4)  # all four requests are out, waiting
    closed_at = time.monotonic()
    nats.close()
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    assert len(outcomes) == 4
    for exc, at in outcomes:
        assert isinstance(exc, ClusterClosedError), exc
        assert at - closed_at < 2
    with pytest.raises(ClusterClosedError):
        nats.request("svc.never", b"after close", timeout=1)


@pytest.mark.timeout(30)
def test_headers_round_trip(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    def handler(msg: Msg) -> tuple[bytes, dict[str, str]]:
        assert msg.headers is not None
        return b"ok", {"Echo-Trace": msg.headers["Trace"], "Served-By": "test"}

    service.serve("svc.hdr", handler)
    reply = client.request("svc.hdr", b"x", headers={"Trace": "abc-123"})
    assert reply.data == b"ok"
    assert reply.headers == {"Echo-Trace": "abc-123", "Served-By": "test"}
    bare = client.request("svc.hdr", b"x", headers={"Trace": ""})
    assert bare.headers is not None and bare.headers["Served-By"] == "test"


@pytest.mark.timeout(30)
def test_respond_from_a_pull_subscription(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    sub = service.subscribe("svc.pull")

    def answer() -> None:
        for _ in range(3):
            msg = sub.next_msg(10)
            assert msg.reply is not None and msg.reply.startswith("_INBOX.")
            msg.respond(b"pong " + msg.data, headers={"N": msg.data.decode()})

    responder = threading.Thread(target=answer)
    responder.start()
    try:
        for i in range(3):
            reply = client.request("svc.pull", b"%d" % i, timeout=10)
            assert (reply.data, reply.headers) == (b"pong %d" % i, {"N": str(i)})
    finally:
        responder.join(15)


@pytest.mark.timeout(30)
def test_bad_input_raises_in_the_caller(server: NatsServer, client: SyncNatsCluster) -> None:
    for subject in ("svc.*", "svc.>", "svc..x", "", "svc x", ".svc"):
        with pytest.raises(InvalidMessageError) as info:
            client.request(subject, b"x", timeout=5)
        assert isinstance(info.value, ValueError), subject
    for payload in ("text", 12, None, [1]):
        with pytest.raises(InvalidTypeError) as type_info:
            client.request("svc.ok", payload, timeout=5)  # type: ignore[arg-type]
        assert isinstance(type_info.value, TypeError), payload
    with pytest.raises(InvalidTypeError):
        client.request(b"svc.ok", b"x")  # type: ignore[arg-type]
    with pytest.raises(InvalidMessageError):
        client.request("svc.ok", b"x", timeout=-1)
    with pytest.raises((InvalidMessageError, InvalidTypeError)):
        client.request("svc.ok", b"x", headers={"Bad Name": "v"})
    assert client.stats()["requests"] == 0
    assert server.monitor("varz")["in_msgs"] == 0


@pytest.mark.timeout(30)
def test_a_request_on_the_loop_thread_raises(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    service.serve("svc.loop", echo)
    assert client.request("svc.loop", b"warm").data == b"re:warm"
    outcome: list[BaseException | None] = []

    def on_loop() -> None:
        try:
            client.request("svc.loop", b"x", timeout=1)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    client.loop.call_soon_threadsafe(on_loop)
    wait_until(lambda: bool(outcome))
    assert isinstance(outcome[0], WrongThreadError), outcome
    assert "event loop thread" in str(outcome[0])
    assert client.request("svc.loop", b"still").data == b"re:still"


@pytest.mark.timeout(30)
def test_the_async_core_requests(server: NatsServer, logger: logging.Logger, service: SyncNatsCluster) -> None:
    def handler(msg: Msg) -> Any:
        if msg.data == b"fail":
            raise RuntimeError("out of order")
        if msg.data == b"slow":
            time.sleep(1)
        return b"re:" + msg.data, {"Id": msg.data.decode()}

    service.serve("svc.aio", handler, workers=4)

    async def main() -> None:
        cluster = NatsCluster("aio", [server.url], logger)
        await cluster.connect()
        replies = await asyncio.gather(*(cluster.request("svc.aio", b"%d" % i, timeout=10) for i in range(100)))
        assert [(r.data, r.headers) for r in replies] == [(b"re:%d" % i, {"Id": str(i)}) for i in range(100)]
        with pytest.raises(NoRespondersError):
            await cluster.request("svc.none", b"x", timeout=10)
        with pytest.raises(ServiceError) as info:
            await cluster.request("svc.aio", b"fail", timeout=10)
        assert info.value.code == 500 and "out of order" in info.value.description
        with pytest.raises(ClusterTimeoutError):
            await cluster.request("svc.aio", b"slow", timeout=0.2)
        with pytest.raises(InvalidMessageError):
            await cluster.request("svc.*", b"x")

        pending = asyncio.ensure_future(cluster.request("svc.aio", b"slow", timeout=30))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await cluster.close()
        with pytest.raises(ClusterClosedError):
            await pending
        assert time.monotonic() - started < 3
        assert cluster.stats()["requests"] == 104

    asyncio.run(main())


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_an_answered_request_is_not_sent_again_after_a_reconnection(server: NatsServer, logger: logging.Logger) -> None:
    """Replay sends again what the server had not confirmed when the connection dropped,
    but a request whose reply came is done: sending it again would run the handler twice."""
    import collections

    for _ in range(3):
        calls: collections.Counter[bytes] = collections.Counter()

        def handler(msg: Msg, calls: collections.Counter[bytes] = calls) -> bytes:
            calls[msg.data] += 1
            return b"ok"

        with (
            SyncNatsCluster("client", [server.url], logger, reconnect_time_wait=0.1) as client,
            SyncNatsCluster("service", [server.url], logger, reconnect_time_wait=0.1) as service,
        ):
            service.serve("charge", handler)
            assert client.request("charge", b"card-42", timeout=5).data == b"ok"
            server.kill()  # at once: the request's PONG may not have come yet
            server.start()
            deadline = time.monotonic() + 10
            while not (client.is_connected and service.is_connected) and time.monotonic() < deadline:
                time.sleep(0.01)
            client.flush(5)  # a replayed request would be on its way to the service now
            time.sleep(0.5)
            service.flush(5)
            assert calls == {b"card-42": 1}
