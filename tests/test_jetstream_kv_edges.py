"""The key-value store and pull subscriptions at their edges: a stopped (SIGSTOP) server
under every waiting call, the cluster's close() racing a blocked call, bad arguments.
Every call completes or raises an error of the library's tree within its timeout, and
the handle works again afterwards. (A fetch and an ack_sync under SIGSTOP are in
test_jetstream_faults.py; forks and garbage collection in test_jetstream_kv_lifecycle.py.)"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from openfactory_nats import (
    ClusterClosedError,
    ClusterTimeoutError,
    Entry,
    InvalidMessageError,
    InvalidTypeError,
    KeyValue,
    SubscriptionClosedError,
    SyncNatsCluster,
)
from openfactory_nats._jetstream import kv as kv_module
from openfactory_nats._jetstream.handle import JetStream

from .jspeer import Peer, wait_until
from .servers import NatsServer

pytestmark = pytest.mark.slow

MARGIN = 3.0  # what a call may take past its timeout on a shared, loaded machine


@pytest.fixture
def nc(jetstream_server: NatsServer, logger: logging.Logger) -> Iterator[SyncNatsCluster]:
    with SyncNatsCluster("edges", [jetstream_server.url], logger, reconnect_time_wait=0.1, timeout=5.0) as c:
        yield c


@pytest.fixture
def kv(nc: SyncNatsCluster) -> KeyValue:
    store = nc.jetstream().create_key_value("assets", history=5)
    store.put("a", b"1")
    return store


def bad(value: object) -> Any:
    """*value*, whatever its type, for the type checker."""
    return value


def timed(call: Callable[[], object]) -> tuple[object, float]:
    """What *call* returned or raised, and how long it took."""
    started = time.monotonic()
    try:
        result: object = call()
    except BaseException as exc:  # noqa: BLE001 - the test looks at it
        result = exc
    return result, time.monotonic() - started


class Blocked:
    """*call* on a thread of its own: what it returned or raised, and when."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.outcome: list[tuple[object, float]] = []
        self._thread = threading.Thread(target=lambda: self.outcome.append(timed(call)), daemon=True)
        self._thread.start()

    def result(self, within: float) -> tuple[object, float]:
        self._thread.join(within)
        assert not self._thread.is_alive(), "the call hung"
        return self.outcome[0]


# -- a stopped server --------------------------------------------------------------------


def kv_calls(kv: KeyValue) -> dict[str, Callable[[float], object]]:
    return {
        "get": lambda t: kv.get("a", timeout=t),
        "get_revision": lambda t: kv.get("a", revision=1, timeout=t),
        "put": lambda t: kv.put("a", b"frozen", timeout=t),
        "update": lambda t: kv.update("a", b"frozen", last=kv_last[0], timeout=t),
        "create": lambda t: kv.create("new", b"frozen", timeout=t),
        "delete": lambda t: kv.delete("gone", timeout=t),
        "keys": lambda t: kv.keys(timeout=t),
        "history": lambda t: kv.history("a", timeout=t),
    }


kv_last = [0]  # the revision an update expects
KV_CALLS = ["get", "get_revision", "put", "update", "create", "delete", "keys", "history"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", KV_CALLS)
def test_a_kv_call_on_a_stopped_server_raises_timeout_within_its_timeout_then_works(
    call: str, kv: KeyValue, jetstream_server: NatsServer
) -> None:
    kv_last[0] = kv.get("a").revision
    jetstream_server.pause()
    try:
        result, took = timed(lambda: kv_calls(kv)[call](1.0))
    finally:
        jetstream_server.resume()
    assert isinstance(result, ClusterTimeoutError), result
    assert took < 1.0 + MARGIN
    # The server answers again; what the stopped server held may have gone through since.
    assert kv.put("a", b"after", timeout=5) > 0
    assert kv.get("a", timeout=5).value == b"after"
    assert "a" in kv.keys(timeout=5)


@pytest.mark.timeout(60)
def test_a_watch_waiting_on_a_stopped_server_times_out_then_delivers_again(
    kv: KeyValue, jetstream_server: NatsServer
) -> None:
    with kv.watch(">") as w:
        w.wait_caught_up(5)
        assert w.next(5).value == b"1"
        waiting = Blocked(lambda: w.next(1.5))
        time.sleep(0.2)
        jetstream_server.pause()
        try:
            result, took = waiting.result(1.5 + MARGIN)
            assert isinstance(result, ClusterTimeoutError) and took < 1.5 + MARGIN, result
            result, took = timed(lambda: w.next(1.0))
            assert isinstance(result, ClusterTimeoutError) and took < 1.0 + MARGIN, result
            w.wait_caught_up(1.0)  # caught up already: at once
            # Longer than the heartbeats' 3 x 5 s would make the monitor remake the consumer:
            # it must not hold anything the caller needs meanwhile.
            time.sleep(1.5)
            result, took = timed(lambda: w.next(0.5))
            assert isinstance(result, ClusterTimeoutError) and took < 0.5 + MARGIN, result
        finally:
            jetstream_server.resume()
        rev = kv.put("a", b"2", timeout=5)
        e = w.next(10)
        assert (e.key, e.value, e.revision) == ("a", b"2", rev)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("with_callback", [False, True])
def test_a_watch_whose_heartbeats_stop_with_the_server_keeps_stop_bounded_then_resumes(
    with_callback: bool, kv: KeyValue, jetstream_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped long enough for the watch's thread to give its consumer up and try to make
    others (each try timing out, each leaving a consumer to delete): reads keep their
    timeouts meanwhile, the watch misses nothing after SIGCONT, and stop() keeps its own."""
    monkeypatch.setattr(kv_module, "HEARTBEAT", 0.5)  # given up after 1.5 s without one
    seen: list[Entry] = []
    w = kv.watch(">", seen.append if with_callback else None, timeout=2.0)
    w.wait_caught_up(5)
    jetstream_server.pause()
    try:
        time.sleep(6)  # the watch's thread tries, and fails, to remake the consumer
        if not with_callback:
            w.next(1)  # the entry of before
            result, took = timed(lambda: w.next(1.0))
            assert isinstance(result, ClusterTimeoutError) and took < 1.0 + MARGIN, result
        assert w.resets >= 1
    finally:
        jetstream_server.resume()
    rev = kv.put("a", b"2", timeout=5)

    def got() -> list[bytes]:
        if with_callback:
            return [e.value for e in seen if e.revision == rev]
        try:
            return [e.value for e in [w.next(0.2)] if e.revision == rev]
        except ClusterTimeoutError:
            return []

    assert wait_until(lambda: got() == [b"2"], timeout=20)
    jetstream_server.pause()
    try:
        time.sleep(6)  # consumers to delete pile up again
        result, took = timed(lambda: w.stop(1.0))
    finally:
        jetstream_server.resume()
    assert result is None and took < 1.0 + MARGIN, (result, took)


@pytest.mark.timeout(60)
def test_a_watch_made_on_a_stopped_server_raises_timeout_and_leaves_no_subscription(
    kv: KeyValue, nc: SyncNatsCluster, jetstream_server: NatsServer
) -> None:
    before = nc.stats()["subscriptions"]
    jetstream_server.pause()
    try:
        result, took = timed(lambda: kv.watch(">", timeout=1.0))
    finally:
        jetstream_server.resume()
    assert isinstance(result, ClusterTimeoutError) and took < 1.0 + MARGIN, result
    assert wait_until(lambda: nc.stats()["subscriptions"] == before, timeout=5)
    with kv.watch(">") as w:
        assert w.next(5).value == b"1"


@pytest.mark.timeout(60)
def test_stopping_a_watch_on_a_stopped_server_keeps_its_timeout(kv: KeyValue, jetstream_server: NatsServer) -> None:
    w = kv.watch(">", lambda e: None)
    w.wait_caught_up(5)
    jetstream_server.pause()
    try:
        result, took = timed(lambda: w.stop(1.0))
    finally:
        jetstream_server.resume()
    assert result is None and took < 1.0 + MARGIN, (result, took)
    assert kv.get("a", timeout=5).value == b"1"


# -- close() from another thread ---------------------------------------------------------


def _closing(nc: SyncNatsCluster, blocked: Blocked, pause: float = 0.5) -> None:
    time.sleep(pause)  # the call is waiting
    started = time.monotonic()
    nc.close(3)
    assert time.monotonic() - started < 3 + MARGIN


def _closed_or_done(result: object) -> None:
    """The call returned, or raised ClusterClosedError; nothing else."""
    if isinstance(result, BaseException):
        assert isinstance(result, ClusterClosedError), repr(result)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["get", "put", "update", "keys"])
def test_close_while_a_kv_call_waits_on_a_stopped_server_ends_it(
    call: str, jetstream_server: NatsServer, logger: logging.Logger
) -> None:
    cluster = SyncNatsCluster("closing", [jetstream_server.url], logger, reconnect_time_wait=0.1)
    kv = cluster.jetstream().create_key_value("assets")
    kv_last[0] = kv.put("a", b"1")
    jetstream_server.pause()
    try:
        blocked = Blocked(lambda: kv_calls(kv)[call](30.0))
        _closing(cluster, blocked)
        result, took = blocked.result(MARGIN)
    finally:
        jetstream_server.resume()
    assert isinstance(result, ClusterClosedError), repr(result)
    with pytest.raises(ClusterClosedError):
        kv.get("a", timeout=1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["next", "iterate", "wait_caught_up"])
def test_close_while_a_thread_reads_a_watch_ends_the_read(
    how: str, jetstream_server: NatsServer, logger: logging.Logger
) -> None:
    cluster = SyncNatsCluster("closing", [jetstream_server.url], logger, reconnect_time_wait=0.1)
    kv = cluster.jetstream().create_key_value("assets")
    kv.put("a", b"1")
    w = kv.watch(">")
    w.wait_caught_up(5)
    assert w.next(5).value == b"1"
    if how == "wait_caught_up":
        w._caught.clear()  # as a watch that has not caught up yet
    reads: dict[str, Callable[[], object]] = {
        "next": lambda: w.next(30),
        "iterate": lambda: list(w),
        "wait_caught_up": lambda: w.wait_caught_up(30),
    }
    blocked = Blocked(reads[how])
    _closing(cluster, blocked)
    result, took = blocked.result(2 * MARGIN)
    if how == "iterate":
        assert result == []  # the iteration ended
    else:
        assert isinstance(result, ClusterClosedError), repr(result)
    with pytest.raises(SubscriptionClosedError):
        w.next(1)
    w.stop(1)  # idempotent after the close
    assert wait_until(lambda: not w._monitor.is_alive(), timeout=5)


@pytest.mark.timeout(60)
def test_close_while_a_fetch_waits_ends_it(jetstream_server: NatsServer, logger: logging.Logger) -> None:
    cluster = SyncNatsCluster("closing", [jetstream_server.url], logger, reconnect_time_wait=0.1)
    js = cluster.jetstream()
    js.add_stream("WORK", ["work.>"])
    sub = js.pull_subscribe("work.>", "waiting")
    blocked = Blocked(lambda: sub.fetch(5, 30))
    _closing(cluster, blocked)
    result, took = blocked.result(MARGIN)
    _closed_or_done(result)
    if not isinstance(result, BaseException):
        assert result == []
    with pytest.raises(ClusterClosedError):
        sub.fetch(1, 1)


@pytest.mark.timeout(60)
def test_close_while_a_fetch_waits_on_a_stopped_server_ends_it(
    jetstream_server: NatsServer, logger: logging.Logger
) -> None:
    cluster = SyncNatsCluster("closing", [jetstream_server.url], logger, reconnect_time_wait=0.1)
    js = cluster.jetstream()
    js.add_stream("WORK", ["work.>"])
    sub = js.pull_subscribe("work.>", "waiting")
    jetstream_server.pause()
    try:
        blocked = Blocked(lambda: sub.fetch(5, 30))
        _closing(cluster, blocked)
        result, took = blocked.result(MARGIN)
    finally:
        jetstream_server.resume()
    _closed_or_done(result)


@pytest.mark.timeout(60)
def test_close_while_ack_sync_waits_on_a_stopped_server_ends_it(
    jetstream_server: NatsServer, logger: logging.Logger, peer: Peer
) -> None:
    cluster = SyncNatsCluster("closing", [jetstream_server.url], logger, reconnect_time_wait=0.1)
    js = cluster.jetstream()
    js.add_stream("WORK", ["work.>"])
    peer.publish("work.1", b"x")
    sub = js.pull_subscribe("work.>", "acking")
    [msg] = sub.fetch(1, 5)
    jetstream_server.pause()
    try:
        blocked = Blocked(lambda: msg.ack_sync(30))
        _closing(cluster, blocked)
        result, took = blocked.result(MARGIN)
    finally:
        jetstream_server.resume()
    assert isinstance(result, ClusterClosedError), repr(result)
    assert not msg.acked


# -- bad arguments -----------------------------------------------------------------------


def _bad_kv_calls(js: JetStream, kv: KeyValue) -> list[tuple[type[Exception], Callable[[], object]]]:
    return [
        (InvalidTypeError, lambda: kv.get(bad(None))),
        (InvalidTypeError, lambda: kv.get(bad(b"a"))),
        (InvalidTypeError, lambda: kv.get("a", revision=bad("1"))),
        (InvalidMessageError, lambda: kv.get("a", revision=-1)),
        (InvalidTypeError, lambda: kv.get("a", revision=bad(True))),
        (InvalidTypeError, lambda: kv.get("a", timeout=bad("1"))),
        (InvalidMessageError, lambda: kv.get("a", timeout=-1)),
        (InvalidMessageError, lambda: kv.get("a", timeout=math.nan)),
        (InvalidTypeError, lambda: kv.put(bad(None), b"x")),
        (InvalidTypeError, lambda: kv.put("a", bad("text"))),
        (InvalidTypeError, lambda: kv.put("a", bad(None))),
        (InvalidTypeError, lambda: kv.put("a", bad(5))),
        (InvalidTypeError, lambda: kv.put("a", b"x", timeout=bad("1"))),
        (InvalidMessageError, lambda: kv.put("a", b"x", timeout=-1)),
        (InvalidTypeError, lambda: kv.update("a", b"x", last=bad(None))),
        (InvalidTypeError, lambda: kv.update("a", b"x", last=bad(1.0))),
        (InvalidMessageError, lambda: kv.update("a", b"x", last=-1)),
        (InvalidTypeError, lambda: kv.create(bad(None), b"x")),
        (InvalidTypeError, lambda: kv.create("n", bad("x"))),
        (InvalidTypeError, lambda: kv.delete("a", last=bad("1"))),
        (InvalidTypeError, lambda: kv.purge(bad(None))),
        (InvalidTypeError, lambda: kv.history(bad(None))),
        (InvalidTypeError, lambda: kv.keys(bad(5))),
        (InvalidMessageError, lambda: kv.keys(timeout=-1)),
        (InvalidTypeError, lambda: kv.watch(bad(None))),
        (InvalidTypeError, lambda: kv.watch(">", bad("not callable"))),
        (InvalidTypeError, lambda: kv.watch(">", timeout=bad("1"))),
        (InvalidTypeError, lambda: js.key_value(bad(None))),
        (InvalidTypeError, lambda: js.key_value(bad(5))),
        (InvalidTypeError, lambda: js.create_key_value(bad(None))),
        (InvalidTypeError, lambda: js.create_key_value("h", history=bad("5"))),
        (InvalidMessageError, lambda: js.create_key_value("h", history=0)),
        (InvalidMessageError, lambda: js.create_key_value("h", ttl=-1)),
        (InvalidTypeError, lambda: js.delete_key_value(bad(None))),
    ]


@pytest.mark.timeout(60)
def test_bad_kv_arguments_raise_in_the_caller_and_the_handle_keeps_working(nc: SyncNatsCluster, kv: KeyValue) -> None:
    js = nc.jetstream()
    wrong: list[str] = []
    for i, (kind, call) in enumerate(_bad_kv_calls(js, kv)):
        try:
            call()
        except kind:
            continue
        except BaseException as exc:  # noqa: BLE001 - reported
            wrong.append(f"#{i}: {exc!r} instead of {kind.__name__}")
        else:
            wrong.append(f"#{i}: no error instead of {kind.__name__}")
    assert not wrong, "\n".join(wrong)
    assert kv.get("a").value == b"1"
    assert kv.put("a", b"2") > 0
    assert kv.keys() == ["a"]


@pytest.mark.timeout(60)
def test_bad_watch_read_arguments_raise_in_the_caller_and_the_watch_keeps_working(kv: KeyValue) -> None:
    with kv.watch(">") as w:
        calls: list[tuple[type[Exception], Callable[[], object]]] = [
            (InvalidTypeError, lambda: w.next(bad("1"))),
            (InvalidMessageError, lambda: w.next(-1)),
            (InvalidMessageError, lambda: w.next(math.nan)),
            (InvalidTypeError, lambda: w.wait_caught_up(bad("1"))),
            (InvalidMessageError, lambda: w.wait_caught_up(-1)),
            (InvalidTypeError, lambda: w.stop(bad("1"))),
        ]
        for kind, call in calls:
            with pytest.raises(kind):
                call()
        assert w.next(5).value == b"1"
        kv.put("a", b"2")
        assert w.next(5).value == b"2"


@pytest.mark.timeout(60)
def test_bad_fetch_and_ack_arguments_raise_in_the_caller_and_the_subscription_keeps_working(
    nc: SyncNatsCluster, peer: Peer
) -> None:
    js = nc.jetstream()
    js.add_stream("WORK", ["work.>"])
    peer.publish_many([("work.1", b"0"), ("work.1", b"1")])
    sub = js.pull_subscribe("work.>", "bad")
    calls: list[tuple[type[Exception], Callable[[], object]]] = [
        (InvalidTypeError, lambda: sub.fetch(bad(None))),
        (InvalidTypeError, lambda: sub.fetch(bad(1.0))),
        (InvalidTypeError, lambda: sub.fetch(bad(True))),
        (InvalidMessageError, lambda: sub.fetch(100_001)),
        (InvalidTypeError, lambda: sub.fetch(1, bad("1"))),
        (InvalidMessageError, lambda: sub.fetch(1, math.inf)),
        (InvalidTypeError, lambda: sub.unsubscribe(bad("1"))),
    ]
    for kind, call in calls:
        with pytest.raises(kind):
            call()
    [msg] = sub.fetch(1, 5)
    acks: list[tuple[type[Exception], Callable[[], object]]] = [
        (InvalidTypeError, lambda: msg.ack_sync(bad("1"))),
        (InvalidMessageError, lambda: msg.ack_sync(-1)),
        (InvalidMessageError, lambda: msg.nak(delay=math.nan)),
        (InvalidMessageError, lambda: msg.nak(delay=bad("1"))),
    ]
    for kind, call in acks:
        with pytest.raises(kind):
            call()
        assert not msg.acked  # the refused call did not use its acknowledgement
    msg.ack_sync(5)
    [second] = sub.fetch(1, 5)
    assert second.data == b"1"
    second.ack_sync(5)
    assert isinstance(sub.fetch(1, 0.2), list)


@pytest.mark.timeout(60)
def test_close_lets_a_watch_reader_take_the_entries_its_drain_delivers(
    jetstream_server: NatsServer, logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster's close() drains the watch's subscription: what it delivers then is
    read by an iterating thread, which ends only after the last of it (none left queued)."""
    from openfactory_nats._jetstream.kv_watch import Watch

    cluster = SyncNatsCluster("draining", [jetstream_server.url], logger, reconnect_time_wait=0.1)
    kv = cluster.jetstream().create_key_value("assets")
    for i in range(40):
        kv.put(f"k{i}", b"v")
    on_msg = Watch._on_msg

    def slow(self: Watch, msg: Any) -> None:  # entries still in flight when the close begins
        time.sleep(0.05)
        on_msg(self, msg)

    monkeypatch.setattr(Watch, "_on_msg", slow)
    w = kv.watch(">")
    got: list[Entry] = []
    reader = threading.Thread(target=lambda: got.extend(w))
    reader.start()
    time.sleep(0.2)
    cluster.close(10)
    reader.join(10)
    assert not reader.is_alive()
    assert len(got) + len(w._entries) == 40  # every entry was delivered by the drain...
    assert len(got) == 40, f"the reader ended with {len(w._entries)} entries left unread"  # ...and read
