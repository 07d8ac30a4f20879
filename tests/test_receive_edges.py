"""Edge cases of the receive side against real nats-server processes: drains that time
out, refused subscriptions, clients nats-py closes, closes from callbacks, collection."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

from openfactory_nats import (
    ClusterState,
    ClusterTimeoutError,
    ClusterUnavailableError,
    Msg,
    NatsCluster,
    NatsClusterError,
    RefusedError,
    SyncNatsCluster,
)

from .servers import NatsServer


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


# -- 1. a drain that times out leaves the subscription orphaned ----------------------
@pytest.mark.timeout(30)
def test_cluster_close_ends_a_subscription_whose_drain_timed_out(server: NatsServer, logger: logging.Logger) -> None:
    """Subscription.drain() removes the receiver from the cluster first; when that step
    times out it raises before closing the inbox, so the subscription is in no cluster's
    list any more: close() of the cluster neither ends its iterator nor joins its thread."""
    nats = SyncNatsCluster("D1", [server.url], logger, timeout=5.0, drain_timeout=1.0)
    try:
        got: list[Msg] = []
        sub = nats.subscribe("d1.cb", callback=got.append)
        pull = nats.subscribe("d1.pull")
        server.pause()  # the drain's flush gets no PONG
        try:
            with pytest.raises(ClusterTimeoutError):
                sub.drain(timeout=0.5)
            with pytest.raises(ClusterTimeoutError):
                pull.drain(timeout=0.5)
        finally:
            server.resume()
    finally:
        nats.close(timeout=3)
    # After close() of the cluster every subscription is closed and every thread joined.
    assert not sub.is_open, "a subscription outlived close() of its cluster"
    assert not _threads("openfactory-nats-D1-d1.cb"), "close() left the subscription's thread running"
    with pytest.raises(NatsClusterError):
        pull.next_msg(0.2)  # the iterator must end: a ClusterTimeoutError here means it never will


# -- 2. a drain that times out kills nats-py's read loop ------------------------------
@pytest.mark.timeout(30)
def test_a_timed_out_drain_does_not_stop_the_other_subscriptions(server: NatsServer, logger: logging.Logger) -> None:
    """The drain's nats-py flush is cancelled by the caller's timeout, leaving a cancelled
    future in the client's PONG queue; when the server answers, nats-py's read loop dies
    on ``set_result`` (InvalidStateError) and the client, still "connected", receives
    nothing more: every other subscription of the cluster stops, silently."""
    # A long ping interval so that nats-py's stale-connection check does not hide it.
    with SyncNatsCluster("D2", [server.url], logger, timeout=5.0, ping_interval=120) as nats:
        other = nats.subscribe("d2.other")
        victim = nats.subscribe("d2.victim")
        server.pause()
        try:
            with pytest.raises(ClusterTimeoutError):
                victim.drain(timeout=0.3)
        finally:
            server.resume()
        time.sleep(0.5)  # the server answers the PONGs outstanding
        assert nats.is_connected
        nats.publish("d2.other", b"after")  # publishing still works: the flusher is alive
        msg = other.next_msg(3)  # ClusterTimeoutError: nats-py reads nothing any more
        assert msg.data == b"after"


# -- 3. close() lets callbacks drain past drain_timeout ------------------------------
@pytest.mark.timeout(30)
def test_close_bounds_the_callback_drain_by_drain_timeout(server: NatsServer, logger: logging.Logger) -> None:
    """close() drains the subscriptions "within drain_timeout", but the thread side gives
    the callbacks the whole call timeout (plus a margin) instead."""
    started = threading.Event()

    def slow(msg: Msg) -> None:
        started.set()
        time.sleep(0.2)

    nats = SyncNatsCluster("D3", [server.url], logger, timeout=10.0, drain_timeout=0.5)
    nats.subscribe("d3.slow", callback=slow)
    for i in range(25):  # 5 s of work for the callback
        nats.publish("d3.slow", b"%d" % i)
    nats.flush(5)
    assert started.wait(5)
    t0 = time.monotonic()
    nats.close()
    elapsed = time.monotonic() - t0
    assert elapsed < 3.0, f"close() took {elapsed:.1f} s with drain_timeout=0.5"


# -- 4. a cluster with a subscription is never collected -----------------------------
@pytest.mark.timeout(30)
def test_a_dropped_cluster_with_a_subscription_is_collected_and_stops(
    server: NatsServer, logger: logging.Logger
) -> None:
    """The finalizer holds the core, the core its receivers, each receiver the facade's
    bound ``_respond`` (and the inbox its ``_check_thread``): the facade can never be
    collected once it has a subscription, so its loop thread and the subscription's
    thread run until the interpreter exits."""

    def make() -> weakref.ref[SyncNatsCluster]:
        nats = SyncNatsCluster("D4", [server.url], logger)
        nats.subscribe("d4.x", callback=lambda m: None)
        return weakref.ref(nats)

    ref = make()
    gc.collect()
    leaked = ref()
    if leaked is not None:
        leaked.close(timeout=3)  # not to keep reconnecting through the next tests
        del leaked
        pytest.fail("the cluster is kept alive by its own finalizer (via its subscription)")
    assert wait_until(lambda: not _threads("openfactory-nats-D4"), 5), "its threads still run"


# -- 5. a subscription the server refused is reported as made -------------------------
@pytest.mark.timeout(30)
def test_subscribe_refused_by_server_permissions_raises(tmp_path: Path, logger: logging.Logger) -> None:
    """The server answers ``-ERR 'Permissions Violation for Subscription to ...'`` and
    then the PONG: subscribe() returns a Subscription "once the server has registered the
    interest", which it never did; nothing will ever be delivered."""
    conf = tmp_path / "perm.conf"
    conf.write_text(
        'authorization { users = [ { user: "u", password: "p", '
        'permissions: { subscribe: { allow: ["ok.>"] }, publish: { allow: [">"] } } } ] }\n'
    )
    srv = NatsServer(name="perm", config=str(conf)).start()
    try:
        url = f"nats://u:p@127.0.0.1:{srv.port}"
        with SyncNatsCluster("D5", [url], logger, timeout=5.0) as nats:
            nats.subscribe("ok.fine").unsubscribe()
            with pytest.raises(NatsClusterError):
                nats.subscribe("secret.x")
    finally:
        srv.close()


def _subscribe_at_once(nats: SyncNatsCluster, subjects: list[str], queue: str | None = None) -> dict[str, Any]:
    """Subscribe to each of *subjects* from its own thread, all released at once: the
    outcome per subject, a Subscription or the exception raised."""
    outcome: dict[str, Any] = {}
    start = threading.Barrier(len(subjects))

    def run(subject: str) -> None:
        start.wait(10)
        try:
            outcome[subject] = nats.subscribe(subject, queue=queue)
        except BaseException as exc:  # noqa: BLE001 - what escapes is what is tested
            outcome[subject] = exc

    threads = [threading.Thread(target=run, args=(s,)) for s in subjects]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    return outcome


@pytest.mark.timeout(60)
def test_a_refusal_is_matched_to_its_own_subscription(tmp_path: Path, logger: logging.Logger) -> None:
    """Threads subscribe at once to permitted and forbidden subjects: a permitted one was
    refused (RefusedError) whenever a forbidden one's -ERR came while it waited for its
    PONG; the server names the subject (and queue) it refuses, and only that one is."""
    conf = tmp_path / "perm.conf"
    conf.write_text(
        'authorization { users = [ { user: "u", password: "p", '
        'permissions: { subscribe: { allow: ["ok.>"] }, publish: { allow: [">"] } } } ] }\n'
    )
    srv = NatsServer(name="perm", config=str(conf)).start()
    try:
        url = f"nats://u:p@127.0.0.1:{srv.port}"
        with SyncNatsCluster("D5b", [url], logger, timeout=5.0) as nats:
            wrong: list[str] = []
            for round_ in range(8):
                queue = "g" if round_ % 2 else None
                # "ok.>" is permitted, "no.>" is not; the server quotes subject and queue
                # as Go's %q does (escapes) and nats-py lowercases its text.
                subjects = [f"{p}.{round_}{i}" for i in range(4) for p in ("ok", "no")]
                subjects += [f'ok.{round_}"q', f'no.{round_}"\\\u00adÉ']
                for subject, got in _subscribe_at_once(nats, subjects, queue).items():
                    if subject.startswith("ok."):
                        if isinstance(got, BaseException):
                            wrong.append(f"permitted {subject!r} (queue {queue}) raised {got!r}")
                        else:
                            got.unsubscribe()
                    elif not isinstance(got, RefusedError):
                        wrong.append(f"forbidden {subject!r} (queue {queue}) gave {got!r}")
            assert not wrong, "\n".join(wrong)
            assert nats.stats()["subscriptions"] == 0
    finally:
        srv.close()


# -- 6. subscribe on a closed cluster starts a thread it does not join -----------------
@pytest.mark.timeout(30)
def test_subscribe_on_a_closed_cluster_leaves_no_thread(server: NatsServer, logger: logging.Logger) -> None:
    """The inbox (and its own thread) is made before the cluster is checked; on the
    failure path it is closed with timeout=0, so the thread is not joined."""
    nats = SyncNatsCluster("D6", [server.url], logger)
    nats.close()
    old = sys.getswitchinterval()
    sys.setswitchinterval(30)  # the worker may not run before we look
    try:
        with pytest.raises(NatsClusterError):
            nats.subscribe("d6.x", callback=lambda m: None)
        alive = _threads("openfactory-nats-D6-")
    finally:
        sys.setswitchinterval(old)
    assert not alive, "subscribe() raised but left its worker thread running"


# -- 7. drain() from the subscription's own callback -----------------------------------
@pytest.mark.timeout(30)
def test_drain_from_its_own_callback_does_not_raise_a_false_timeout(server: NatsServer, logger: logging.Logger) -> None:
    """From its own callback, Inbox.close() does not wait (it cannot), and drain() turns
    that "not done yet" into ClusterTimeoutError("not drained within 5 s") at once,
    although the drain goes on and completes in the background."""
    outcome: dict[str, Any] = {}
    done = threading.Event()
    holder: dict[str, Any] = {}
    seen: list[bytes] = []

    def on_message(msg: Msg) -> None:
        seen.append(msg.data)
        if msg.data == b"0":
            time.sleep(0.3)  # the others arrive meanwhile
            t0 = time.monotonic()
            try:
                holder["sub"].drain(timeout=5)
                outcome["raised"] = None
            except BaseException as exc:  # noqa: BLE001
                outcome["raised"] = exc
            outcome["elapsed"] = time.monotonic() - t0
            done.set()

    with SyncNatsCluster("D7", [server.url], logger) as nats:
        holder["sub"] = nats.subscribe("d7.x", callback=on_message)
        for i in range(5):
            nats.publish("d7.x", b"%d" % i)
        nats.flush(5)
        assert done.wait(10)
        assert wait_until(lambda: len(seen) == 5, 5)  # the drain did complete
    assert outcome["raised"] is None, f"raised after {outcome['elapsed']:.3f} s: {outcome['raised']!r}"


# -- 8. a subscription the server refuses closes nats-py's client ----------------------
def _max_subs_server(tmp_path: Path) -> NatsServer:
    conf = tmp_path / "maxsubs.conf"
    conf.write_text("max_subscriptions: 2\n")
    return NatsServer(name="maxsubs", config=str(conf)).start()


@pytest.mark.timeout(30)
def test_subscribe_beyond_max_subscriptions_raises(tmp_path: Path, logger: logging.Logger) -> None:
    """The server answers -ERR 'Maximum Subscriptions Exceeded'; nats-py closes the client
    for good; subscribe() still returns a Subscription as if the server had registered it."""
    srv = _max_subs_server(tmp_path)
    try:
        with SyncNatsCluster("D8", [srv.url], logger, timeout=3.0) as nats:
            nats.subscribe("d8.a")
            nats.subscribe("d8.b")
            with pytest.raises(NatsClusterError):
                nats.subscribe("d8.c")
    finally:
        srv.close()


@pytest.mark.timeout(30)
def test_subscriptions_come_back_after_nats_py_closed_the_client(tmp_path: Path, logger: logging.Logger) -> None:
    """When nats-py closes its client for good (here on the -ERR of a refused subscription,
    the server being up all along), the cluster waits for the "next use" to connect again:
    a process that only subscribes never gets another message, on any subscription."""
    srv = _max_subs_server(tmp_path)
    try:
        with (
            SyncNatsCluster("D8b", [srv.url], logger, timeout=3.0) as nats,
            SyncNatsCluster("pub", [srv.url], logger, timeout=3.0) as publisher,
        ):
            first = nats.subscribe("d8.a")
            nats.subscribe("d8.b")
            with contextlib.suppress(NatsClusterError):
                nats.subscribe("d8.c")  # refused by the server: nats-py closes its client
            got: list[bytes] = []
            deadline = time.monotonic() + 8
            while not got and time.monotonic() < deadline:
                publisher.publish("d8.a", b"x")
                publisher.flush(3)
                with contextlib.suppress(ClusterTimeoutError):
                    got.append(first.next_msg(0.5).data)
            assert got, f"no message on the first subscription within 8 s; cluster state {nats.state.value}"
    finally:
        srv.close()


@pytest.mark.timeout(60)
def test_subscriptions_beyond_max_subscriptions_at_once_raise_only_documented_errors(
    tmp_path: Path, logger: logging.Logger
) -> None:
    """Threads subscribe at once beyond the server's limit: nats-py closes its client on
    the first -ERR 'maximum subscriptions exceeded', and a thread that called
    nc.subscribe() before the cluster heard of it got nats-py's ConnectionClosedError.
    Only the library's errors come out, no more subscriptions are made than the server
    allows, and the instance goes on working."""
    srv = _max_subs_server(tmp_path)  # max_subscriptions: 2
    try:
        for round_ in range(4):
            with SyncNatsCluster(f"D8c{round_}", [srv.url], logger, timeout=5.0) as nats:
                outcome = _subscribe_at_once(nats, [f"d8c.{i}" for i in range(12)])
                foreign = {
                    s: repr(e)
                    for s, e in outcome.items()
                    if isinstance(e, BaseException) and not isinstance(e, RefusedError | ClusterUnavailableError)
                }
                assert not foreign, f"round {round_}: not the library's documented errors: {foreign}"
                made = [sub for sub in outcome.values() if not isinstance(sub, BaseException)]
                assert len(made) <= 2, f"round {round_}: {len(made)} subscriptions made, the server allows 2"
                assert nats.stats()["subscriptions"] == len(made)
                # Still usable: publishing reaches a subscription made here.
                for sub in made:
                    sub.unsubscribe()
                check = nats.subscribe("d8c.check")
                nats.publish("d8c.check", b"still works")
                assert check.next_msg(5).data == b"still works"
    finally:
        srv.close()


# -- 9. close() from a callback while another thread closes ---------------------------
@pytest.mark.timeout(30)
def test_close_from_a_callback_during_close_does_not_stall_both(server: NatsServer, logger: logging.Logger) -> None:
    """Thread A's close() holds the close lock and waits for the subscriptions to drain;
    a callback calling close() waits for that lock: each waits for the other until the
    timeouts run out (close() took timeout + 2 s for a subscription with nothing left)."""
    entered = threading.Event()
    outcome: dict[str, float] = {}
    nats = SyncNatsCluster("D9", [server.url], logger, timeout=3.0)

    def on_message(msg: Msg) -> None:
        entered.set()
        wait_until(lambda: nats.state.value == "closed", 5)  # A's close() is past the core's close
        t0 = time.monotonic()
        nats.close()
        outcome["callback"] = time.monotonic() - t0

    nats.subscribe("d9.x", callback=on_message)
    nats.publish("d9.x", b"1")
    nats.flush(5)
    assert entered.wait(5)
    t0 = time.monotonic()
    nats.close()
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5, f"close() took {elapsed:.1f} s (the callback's close: {outcome})"


# -- 10. dispatcher threads of a collected router -------------------------------------
@pytest.mark.timeout(30)
def test_a_collected_router_stops_its_dispatcher_threads(server: NatsServer, logger: logging.Logger) -> None:
    """SyncClusterRouter closes its dispatchers in close(), but its finalizer (a router
    dropped without close()) is given only the clusters' finalizers and the loop."""
    from openfactory_nats import SyncClusterRouter

    def make() -> None:
        router = SyncClusterRouter({"R1": server.url}, logger)
        router.dispatcher(threads=2)
        router.connect()

    make()
    gc.collect()
    # The clusters' loop thread is gone (the finalizer ran); the dispatcher's threads are not.
    assert wait_until(lambda: not _threads("openfactory-nats-router"), 5), [
        t.name for t in _threads("openfactory-nats-router")
    ]


# -- 11. a cluster collected on its loop thread -----------------------------------------
@pytest.mark.timeout(30)
def test_a_cluster_collected_on_its_loop_thread_stops_its_dispatcher(
    server: NatsServer, logger: logging.Logger
) -> None:
    """_shutdown() on the loop thread schedules the core's close and returns before the
    dispatchers made by SyncNatsCluster.dispatcher() are closed: their threads run forever."""
    nats = SyncNatsCluster("D11", [server.url], logger)
    nats.connect()
    nats.dispatcher(threads=2)
    loop_thread = nats._runner.thread
    holder = [nats]
    del nats
    holder[0].loop.call_soon_threadsafe(holder.clear)  # the last reference goes on the loop thread
    loop_thread.join(10)
    assert not loop_thread.is_alive()
    assert wait_until(lambda: not _threads("openfactory-nats-D11-dispatcher"), 5), "dispatcher threads leaked"


# -- 12. a message that cannot be read ends nats-py's read loop -------------------------
class RawPublisher:
    """A publisher speaking the protocol on a plain socket, which sends bytes no client
    library would (nats-server forwards them as they came)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._buf = b""
        self._read_until(b"\r\n")  # INFO
        self.send(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')

    def _read_until(self, end: bytes) -> None:
        while end not in self._buf:
            chunk = self.sock.recv(4096)
            assert chunk, f"the server closed the raw connection: {self._buf!r}"
            self._buf += chunk
        assert b"-ERR" not in self._buf, self._buf
        self._buf = self._buf[self._buf.index(end) + len(end) :]

    def send(self, data: bytes) -> None:
        """Send *data*, then wait for the server's PONG: the server has processed it."""
        self.sock.sendall(data + b"PING\r\n")
        self._read_until(b"PONG\r\n")

    def close(self) -> None:
        self.sock.close()


UNREADABLE = {
    "subject": b"PUB m.\xff\xfe 3\r\nbad\r\n",
    "reply": b"PUB m.reply r.\xff 3\r\nbad\r\n",
    "status": b"HPUB m.status 16 19\r\nNATS/1.0 \xff\xff\xff\r\n\r\nbad\r\n",  # an inline status, not UTF-8
    "headers": b"HPUB m.headers 2 5\r\nh:bad\r\n",  # a header block without its NATS/1.0 line
}


@pytest.fixture(params=["fast", "public-api"])
def api_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "public-api":
        monkeypatch.setenv("OPENFACTORY_NATS_PUBLIC_API", "1")
    return str(request.param)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("what", sorted(UNREADABLE))
def test_a_message_that_cannot_be_read_is_dropped_and_counted(
    server: NatsServer, logger: logging.Logger, caplog: pytest.LogCaptureFixture, api_mode: str, what: str
) -> None:
    """nats-py hands subject, reply and headers over as bytes, and decoding them raises
    (a subject or reply that is not UTF-8, a status line that is not, a header block
    shorter than ``NATS/1.0``); the error ends nats-py's read loop: the client stays
    "connected" and receives nothing more, on any subscription, until its pings go
    unanswered (here never: ping_interval=120), and the loss is in no counter."""
    with SyncNatsCluster("D12", [server.url], logger, timeout=5.0, ping_interval=120) as nats:
        assert nats.cluster._fast is (api_mode == "fast")
        wildcard = nats.subscribe("m.>")
        other = nats.subscribe("other")
        raw = RawPublisher(server.port)
        try:
            raw.send(UNREADABLE[what])
            raw.send(b"PUB m.good 4\r\ngood\r\nPUB other 5\r\nother\r\n")
            # A dead read loop would leave these waiting for ever (a ClusterTimeoutError).
            msg = wildcard.next_msg(5)
            assert (msg.subject, msg.data) == ("m.good", b"good")
            assert other.next_msg(5).data == b"other"
        finally:
            raw.close()
        assert nats.state.value == "connected"
        stats = nats.stats()
        assert stats["receive_malformed"] == 1, stats
        assert stats["received"] == 2 and stats["reconnects"] == 0 and stats["disconnects"] == 0, stats
        # Still receiving, through the library's own publisher too.
        nats.publish("m.after", b"after")
        assert wildcard.next_msg(5).data == b"after"
    reports = [r for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(reports) == 1 and reports[0].levelno == logging.WARNING, [r.getMessage() for r in reports]
    assert "D12" in reports[0].getMessage()


@pytest.mark.timeout(30)
def test_the_async_core_drops_unreadable_messages_and_reports_them_once(
    server: NatsServer, logger: logging.Logger, caplog: pytest.LogCaptureFixture, api_mode: str
) -> None:
    """The same on NatsCluster; several unreadable messages in a row are counted one by
    one and reported in one line (at most one report every 5 s)."""

    async def main() -> None:
        cluster = NatsCluster("D12a", [server.url], logger, ping_interval=120)
        try:
            sub = await cluster.subscribe("m.>")
            raw = RawPublisher(server.port)
            try:
                raw.send(b"".join(UNREADABLE[what] for what in sorted(UNREADABLE)) + b"PUB m.good 2\r\nok\r\n")
            finally:
                raw.close()
            msg = await sub.next_msg(5)
            assert (msg.subject, msg.data) == ("m.good", b"ok")
            assert cluster.state is ClusterState.CONNECTED
            assert cluster.stats()["receive_malformed"] == len(UNREADABLE)
        finally:
            await cluster.close()

    asyncio.run(main())
    reports = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(reports) == 1 and "D12a" in reports[0], reports


def test_a_subject_split_across_reads_is_read_whole() -> None:
    """nats-py's parser hands a message over once its whole control line has arrived:
    a multi-byte UTF-8 character split between two reads is decoded whole, and an
    unreadable message between two good ones is dropped without losing its neighbours."""
    from nats.aio.client import Client

    from openfactory_nats._natsio import internals

    nc = Client()
    got: list[tuple[str, bytes]] = []
    bad: list[bytes] = []
    internals.guard_messages(nc, lambda subject, exc: bad.append(subject))
    internals.route_messages(nc, 1, lambda subject, reply, data, headers: got.append((subject.decode(), data)))
    stream = "MSG m.é 1 2\r\nok\r\n".encode() + b"MSG m.\xff 1 3\r\nbad\r\n" + "MSG m.ü 1 4\r\nnext\r\n".encode()
    split = stream.index("é".encode()) + 1  # inside the character

    async def feed() -> None:
        for part in (stream[:split], stream[split : split + 20], stream[split + 20 :]):
            await nc._ps.parse(part)

    asyncio.run(feed())
    assert got == [("m.é", b"ok"), ("m.ü", b"next")]
    assert bad == [b"m.\xff"]
