"""Request/reply under stress: reply subjects a requester may send that cannot be
published to, a first request's timeout, the relay under constant thread switches,
close, server restarts and pauses, unsubscribing, serve's worker wake-ups, fork."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from openfactory_nats import (
    BufferFullError,
    ClusterClosedError,
    ClusterTimeoutError,
    InvalidMessageError,
    NatsClusterError,
    SyncNatsCluster,
)
from openfactory_nats._receive.replies import Replies

from .servers import NatsServer, TcpProxy


# -- helpers ------------------------------------------------------------------------------
def raw_publish(server: NatsServer, subject: str, reply: str, payload: bytes = b"") -> None:
    """What a requester that is not this library may send: a PUB with any reply subject
    (the server relays it as it is)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.recv(4096)  # INFO
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        assert b"PONG" in s.recv(4096)
        s.sendall(b"PUB %s %s %d\r\n%s\r\nPING\r\n" % (subject.encode(), reply.encode(), len(payload), payload))
        assert b"PONG" in s.recv(4096)


def wait_until(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def spy(server: NatsServer, logger: logging.Logger) -> Iterator[SyncNatsCluster]:
    """A third party subscribed to everything."""
    with SyncNatsCluster("spy", [server.url], logger) as nats:
        yield nats


# -- reply subjects one cannot publish to --------------------------------------------------
@pytest.mark.timeout(30)
def test_a_requesters_long_reply_subject_does_not_cut_the_services_connection(
    server: NatsServer, service: SyncNatsCluster
) -> None:
    """A reply subject is relayed by the server if the requester's control line fit in
    4096 bytes; the service's reply line (longer sizes, HPUB) may not fit. Before the
    change the library refused a subject over MAX_SUBJECT_BYTES; now the server closes
    the service's connection ('Maximum Control Line Exceeded'), and what it had in
    flight for other peers is dropped."""
    service.serve("rl", lambda msg: b"y" * 100_000)
    service.flush()
    # The requester's line 'PUB rl <reply> 0' has 4096 bytes of arguments (the most the
    # server takes); the reply's, 'PUB <reply> 100000', has 4098.
    raw_publish(server, "rl", "r" * 4091)
    time.sleep(1.0)
    stats = service.stats()
    assert stats["disconnects"] == 0 and stats["dropped_bytes"] == 0, stats
    assert service.is_connected


@pytest.mark.timeout(30)
def test_a_reply_to_an_empty_token_subject_is_not_lost_silently(
    server: NatsServer, service: SyncNatsCluster, spy: SyncNatsCluster
) -> None:
    """The server relays a reply subject with an empty token, and silently drops what is
    published to it (the reason _wire refuses such subjects). Msg.respond used to raise
    InvalidMessageError; now it returns as if the reply had been sent."""
    everything = spy.subscribe(">")
    sub = service.subscribe("review.empty")
    raw_publish(server, "review.empty", "back..here")
    msg = sub.next_msg(timeout=5)
    assert msg.reply == "back..here"
    assert everything.next_msg(timeout=5).subject == "review.empty"
    try:
        msg.respond(b"the answer")
    except InvalidMessageError:
        return  # refused, as any publish to such a subject is
    service.flush()  # the server has read the reply: it went nowhere
    time.sleep(0.3)
    with pytest.raises(ClusterTimeoutError):
        everything.next_msg(timeout=0)
    stats = service.stats()
    assert stats["dropped"] + stats["errors"] > 0, f"respond() returned, the reply was lost, nothing counted: {stats}"


@pytest.mark.timeout(30)
def test_a_reply_is_never_published_to_a_wildcard_subject(
    server: NatsServer, service: SyncNatsCluster, spy: SyncNatsCluster
) -> None:
    """The server relays a wildcard reply subject; publishing to it delivers the reply to
    every wildcard subscription it matches (here a '>' subscriber gets a message on the
    subject 'review.*'). The library refuses wildcards for every publish, and used to for
    replies."""
    everything = spy.subscribe(">")
    sub = service.subscribe("review.wild")
    raw_publish(server, "review.wild", "review.*")
    msg = sub.next_msg(timeout=5)
    assert everything.next_msg(timeout=5).subject == "review.wild"
    try:
        msg.respond(b"the answer")
    except InvalidMessageError:
        pass
    service.flush()
    time.sleep(0.3)
    leaked = []
    while True:
        try:
            leaked.append(everything.next_msg(timeout=0).subject)
        except ClusterTimeoutError:
            break
    assert leaked == []


# -- the first request's timeout ------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_first_request_keeps_its_timeout_when_the_inbox_subscription_was_slow(
    server: NatsServer, logger: logging.Logger
) -> None:
    """request() computes its deadline, subscribes the reply inbox (which may take most
    of the timeout), then queues the request with the *whole* timeout instead of what is
    left of it: with a full buffer the call lasts up to twice its timeout."""
    proxy = TcpProxy(server.port)
    nats = SyncNatsCluster("slowinbox", [proxy.url], logger, max_pending_bytes=64 * 1024)
    try:
        nats.connect()
        client_side = proxy._conns[0]  # the pipe reading it carries client -> server
        server.pause()  # the inbox's SUB and PING wait in the server's socket
        outcome: dict[str, object] = {}

        def request() -> None:
            started = time.monotonic()
            try:
                nats.request("review.nobody", b"q" * 30_000, timeout=2.0)
            except NatsClusterError as exc:
                outcome["error"] = exc
            outcome["took"] = time.monotonic() - started

        thread = threading.Thread(target=request)
        started = time.monotonic()
        thread.start()
        time.sleep(0.3)  # SUB and PING went through the proxy
        proxy._stalled.add(id(client_side))  # from now on the server reads nothing more
        full_since: float | None = None
        while time.monotonic() - started < 1.1:  # fill the buffer, and keep it full
            try:
                nats.publish("review.fill", b"f" * 1000, timeout=0)
                full_since = None
            except BufferFullError:
                full_since = full_since or time.monotonic()
                time.sleep(0.01)
        assert full_since is not None and time.monotonic() - full_since > 0.2
        server.resume()  # the inbox is confirmed at about 1.1 s; the buffer stays full
        while thread.is_alive() and time.monotonic() - started < 10:
            try:  # whatever room appears goes to these small messages
                nats.publish("review.fill", b"f" * 1000, timeout=0)
            except BufferFullError:
                time.sleep(0.005)
        thread.join(10)
        assert not thread.is_alive()
        assert isinstance(outcome.get("error"), ClusterTimeoutError), outcome
        took = outcome["took"]
        assert isinstance(took, float)
        assert took < 2.0 + 0.5, f"request(timeout=2.0) took {took:.2f} s"
    finally:
        server.resume()
        proxy._stalled.clear()
        nats.close(timeout=2)
        proxy.close()


# -- the relay: pure logic under thread switches ----------------------------------------------
@pytest.mark.timeout(60)
def test_relay_bookkeeping_holds_under_thread_switches_at_any_bytecode() -> None:
    """Threads expect/wait/forget while a 'loop' thread delivers their replies (at random
    moments, some after the caller gave up), with the interpreter switching threads as
    often as it can. Each reply ends exactly once: in its caller's hands or counted late;
    no caller is left waiting past its timeout; the relay ends and says so."""
    import queue
    import random
    import sys

    replies = Replies("c")
    ends = [0]
    replies.on_relay_end = lambda: ends.__setitem__(0, ends[0] + 1)
    sent: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    outcomes: list[tuple[str, float]] = []
    errors: list[BaseException] = []

    def loop() -> None:
        rng = random.Random(1)
        while not stop.is_set() or not sent.empty():
            try:
                waiter = sent.get(timeout=0.01)
            except queue.Empty:
                continue
            if rng.random() < 0.2:
                time.sleep(rng.random() * 0.003)
            replies.deliver(waiter.reply, b"", waiter.token, None)

    def requester(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):
                waiter = replies.expect()
                sent.put(waiter)
                timeout = rng.choice((0.0, 0.0005, 0.002, 1.0))
                started = time.monotonic()
                try:
                    answered = waiter.wait(timeout)
                finally:
                    replies.forget(waiter)
                took = time.monotonic() - started
                if waiter.msg is not None:
                    assert waiter.msg.data == waiter.token
                    outcomes.append(("answered" if answered else "answered late", took - timeout))
                else:
                    assert not answered and waiter.error is None
                    outcomes.append(("timeout", took - timeout))
        except BaseException as exc:
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        delivering = threading.Thread(target=loop)
        delivering.start()
        threads = [threading.Thread(target=requester, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(50)
            assert not thread.is_alive()
        stop.set()
        delivering.join(10)
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    timeouts = sum(1 for kind, _ in outcomes if kind == "timeout")
    assert len(outcomes) == 8 * 300
    assert replies.late == timeouts  # every reply ended once: with its caller, or counted late
    assert not replies.relaying() and not replies._queue and not replies._waiting
    assert ends[0] >= 1
    assert max(over for _, over in outcomes) < 1.0  # nobody waited much past its timeout


# -- the relay against a real server ----------------------------------------------------------
def _storm(
    client: SyncNatsCluster, subject: str, threads: int, per_thread: int, timeout: float
) -> tuple[list[threading.Thread], list[tuple[str, float]], list[BaseException]]:
    """Start *threads* requesting in a loop; each outcome is (kind, seconds past timeout)."""
    outcomes: list[tuple[str, float]] = []
    unexpected: list[BaseException] = []

    def work(i: int) -> None:
        for n in range(per_thread):
            payload = b"%d.%d" % (i, n)
            started = time.monotonic()
            try:
                reply = client.request(subject, payload, timeout=timeout)
            except ClusterClosedError:
                outcomes.append(("closed", time.monotonic() - started - timeout))
                return
            except (ClusterTimeoutError, NatsClusterError) as exc:
                outcomes.append((type(exc).__name__, time.monotonic() - started - timeout))
                continue
            except BaseException as exc:  # CancelledError, anything outside the tree
                unexpected.append(exc)
                return
            if reply.data != b"re:" + payload:
                unexpected.append(AssertionError(f"{payload!r} got {reply.data!r}"))
            outcomes.append(("ok", time.monotonic() - started - timeout))

    made = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for thread in made:
        thread.start()
    return made, outcomes, unexpected


@pytest.mark.timeout(60)
def test_close_racing_relayed_requests_ends_every_call_within_its_timeout(
    service: SyncNatsCluster, server: NatsServer, logger: logging.Logger
) -> None:
    service.serve("review.close", lambda msg: b"re:" + msg.data, workers=4)
    client = SyncNatsCluster("closing", [server.url], logger)
    client.request("review.close", b"warm", timeout=5)
    threads, outcomes, unexpected = _storm(client, "review.close", 8, 100_000, 3.0)
    time.sleep(0.5)
    client.close(timeout=5)
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert unexpected == []
    assert sum(1 for kind, _ in outcomes if kind == "closed") == 8
    assert {kind for kind, _ in outcomes} <= {"ok", "closed"}
    assert max(over for _, over in outcomes) < 0.5


@pytest.mark.timeout(90)
@pytest.mark.parametrize("public_api", [False, True], ids=["fast", "public-api"])
def test_relayed_requests_survive_a_server_restart_and_a_pause(
    server: NatsServer, logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, public_api: bool
) -> None:
    """Requests from many threads while the server is paused (SIGSTOP) and restarted:
    every call ends within its timeout (answered, timed out or failed for the lost
    connection), the requests sent afterwards are all answered, and the counters agree."""
    if public_api:
        monkeypatch.setenv("OPENFACTORY_NATS_PUBLIC_API", "1")
    else:
        monkeypatch.delenv("OPENFACTORY_NATS_PUBLIC_API", raising=False)
    with (
        SyncNatsCluster("svc", [server.url], logger, reconnect_time_wait=0.1) as service,
        SyncNatsCluster("cli", [server.url], logger, reconnect_time_wait=0.1) as client,
    ):
        assert client.cluster._fast is not public_api
        service.serve("review.restart", lambda msg: b"re:" + msg.data, workers=3)
        client.request("review.restart", b"warm", timeout=5)
        threads, outcomes, unexpected = _storm(client, "review.restart", 6, 100_000, 1.0)
        time.sleep(0.5)
        server.pause()
        time.sleep(1.5)
        server.resume()
        time.sleep(0.5)
        server.restart()
        time.sleep(1.5)
        count = len(outcomes)
        assert wait_until(lambda: sum(1 for kind, _ in outcomes[count:] if kind == "ok") > 200, 15)
        client.close(timeout=5)
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive()
        assert unexpected == []
        kinds = {kind for kind, _ in outcomes}
        assert kinds <= {"ok", "closed", "ClusterTimeoutError", "ClusterUnavailableError", "NoRespondersError"}, kinds
        assert max(over for _, over in outcomes) < 0.5, sorted(outcomes, key=lambda o: o[1])[-5:]


# -- receiving straight from nats-py's parser; serve's lazy wake-ups ---------------------------
@pytest.mark.timeout(30)
def test_an_unsubscribed_subscription_receives_nothing_more_and_its_route_is_gone(
    server: NatsServer, client: SyncNatsCluster, spy: SyncNatsCluster
) -> None:
    got: list[bytes] = []
    sub = client.subscribe("review.unsub", lambda msg: got.append(msg.data))
    drained = client.subscribe("review.drained")
    spy.publish("review.unsub", b"1")
    spy.publish("review.drained", b"1")
    spy.flush()
    assert wait_until(lambda: got == [b"1"]) and drained.next_msg(timeout=5).data == b"1"
    nc = client.cluster.nc
    routes = nc.__dict__["_openfactory_nats_routes"]
    assert len(routes) == 2
    sub.unsubscribe()
    drained.drain(timeout=5)
    assert routes == {}
    received = client.stats()["received"]
    for _ in range(50):
        spy.publish("review.unsub", b"x")
        spy.publish("review.drained", b"x")
    spy.flush()
    client.flush()
    time.sleep(0.3)
    assert got == [b"1"] and client.stats()["received"] == received == 2


@pytest.mark.timeout(30)
def test_serve_wakes_every_worker_a_batch_needs(
    server: NatsServer, service: SyncNatsCluster, spy: SyncNatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four requests, in one batch, that can only be answered together (their handlers
    meet at a barrier): the offer wakes one worker, the timer the three others."""
    from openfactory_nats._receive.readers import Readers

    looks: list[int] = []
    original = Readers._spread_readers

    def spread_readers(self: Readers) -> None:
        looks.append(len(self._items))
        original(self)

    monkeypatch.setattr(Readers, "_spread_readers", spread_readers)
    barrier = threading.Barrier(4, timeout=5)

    def handler(msg):  # type: ignore[no-untyped-def]
        barrier.wait()
        return b"re:" + msg.data

    service.serve("review.together", handler, workers=4)
    answers = spy.subscribe("review.answers.>")
    service.flush()
    time.sleep(0.2)  # the four workers wait
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.recv(4096)
        s.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        assert b"PONG" in s.recv(4096)
        s.sendall(b"".join(b"PUB review.together review.answers.%d 1\r\n%d\r\n" % (i, i) for i in range(4)))
        got = sorted(answers.next_msg(timeout=10).data for _ in range(4))
    assert got == [b"re:0", b"re:1", b"re:2", b"re:3"]
    assert looks and looks[0] >= 1  # the timer did the waking


@pytest.mark.timeout(60)
def test_a_child_forked_during_relayed_requests_requests_on_its_own(
    service: SyncNatsCluster, client: SyncNatsCluster
) -> None:
    """The parent's requesting threads hold the relay lock, turns and an outbox of
    unkicked requests at any moment; a forked child starts afresh and is answered."""
    import os

    service.serve("review.fork", lambda msg: b"re:" + msg.data, workers=2)
    client.request("review.fork", b"warm", timeout=5)
    threads, outcomes, unexpected = _storm(client, "review.fork", 6, 400, 5.0)
    time.sleep(0.3)
    replies = client.cluster.incoming.replies()
    assert replies is not None
    with replies._relay_lock:  # as if a parent thread held it at the moment of fork
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if client.request("review.fork", b"child", timeout=5).data == b"re:child" else 2
            client.close(timeout=2)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    assert os.waitstatus_to_exitcode(status) == 0
    assert unexpected == [] and {kind for kind, _ in outcomes} == {"ok"}
