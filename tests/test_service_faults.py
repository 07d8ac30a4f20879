"""NATS services (ADR-32) at their edges: a stopped (SIGSTOP) server, the cluster's close
from another thread, a forked child, instances dropped without stop() or close(), and
handlers raising a BaseException. Every call completes, or raises one of the library's
errors within its timeout; nothing hangs, nothing escapes on another thread."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from openfactory_nats import (
    ClusterClosedError,
    ClusterTimeoutError,
    NatsClusterError,
    ServiceError,
    SyncNatsCluster,
)

from .servers import NatsServer
from .test_forksafe import normal_exit, run_child

pytestmark = pytest.mark.timeout(60)

#: What a bounded call may take beyond its timeout (a loaded machine), never a hang.
MARGIN = 2.5


@pytest.fixture
def served(server: NatsServer, logger: logging.Logger) -> Iterator[SyncNatsCluster]:
    """The service's side, reconnecting quickly, with the default timeout (10 s)."""
    with SyncNatsCluster("svc", [server.url], logger, reconnect_time_wait=0.1) as nats_:
        yield nats_


def bounded(call: Callable[[], object], limit: float) -> tuple[object, float]:
    """Run *call*; what it returned or raised (a library error) and how long it took."""
    started = time.monotonic()
    try:
        outcome: object = call()
    except NatsClusterError as exc:
        outcome = exc
    took = time.monotonic() - started
    assert took < limit + MARGIN, f"{took:.2f} s for a call bounded by {limit} s"
    return outcome, took


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run *call* on a thread; the list gets what it returned or raised (anything)."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # noqa: BLE001 - the test looks at whatever escaped
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


# -- a stopped server ------------------------------------------------------------------


def test_stop_while_the_server_is_stopped_keeps_its_timeout(server: NatsServer, served: SyncNatsCluster) -> None:
    svc = served.service("frozen", "1.0.0")
    svc.endpoint("a", lambda msg: b"a", workers=2)
    server.pause()
    try:
        outcome, _ = bounded(lambda: svc.stop(1.0), 1.0)
        assert outcome is None or isinstance(outcome, ClusterTimeoutError | ClusterClosedError), outcome
        assert not svc.running
    finally:
        server.resume()
    served.flush(10)
    assert served.discover("frozen", timeout=0.5) == []


def test_a_service_made_while_the_server_is_stopped_keeps_its_timeout(
    server: NatsServer, served: SyncNatsCluster
) -> None:
    served.connect(5)
    server.pause()
    try:
        outcome, _ = bounded(lambda: served.service("late", "1.0.0", timeout=1.0), 1.0)
        assert isinstance(outcome, ClusterTimeoutError), outcome
    finally:
        server.resume()
    served.flush(10)
    assert served.discover("late", timeout=0.5) == []  # nothing left subscribed


def test_discover_while_the_server_is_stopped_keeps_its_timeout(server: NatsServer, served: SyncNatsCluster) -> None:
    svc = served.service("seen", "1.0.0")
    server.pause()
    try:
        outcome, _ = bounded(lambda: served.discover(timeout=1.0), 1.0)
        assert outcome == [] or isinstance(outcome, ClusterTimeoutError), outcome
    finally:
        server.resume()
    assert [i.id for i in served.discover("seen", timeout=1.0)] == [svc.id]  # working again


def test_endpoint_while_the_server_is_stopped_keeps_its_timeout_and_stop_does_not_wait_for_it(
    server: NatsServer, served: SyncNatsCluster, client: SyncNatsCluster
) -> None:
    svc = served.service("sub", "1.0.0")
    server.pause()
    try:
        outcome, _ = bounded(lambda: svc.endpoint("a", lambda msg: b"a", timeout=1.0), 1.0)
        assert isinstance(outcome, ClusterTimeoutError), outcome
        # One subscribing for long: a stop() meanwhile keeps its own timeout.
        adding, added = in_thread(lambda: svc.endpoint("b", lambda msg: b"b", timeout=8.0))
        time.sleep(0.3)
        outcome, _ = bounded(lambda: svc.stop(1.0), 1.0)
        assert outcome is None or isinstance(outcome, NatsClusterError), outcome
        assert not svc.running
    finally:
        server.resume()
    adding.join(15)
    assert not adding.is_alive()
    assert isinstance(added[0], ClusterClosedError | ClusterTimeoutError), added  # not left serving
    assert svc.endpoints == ()
    served.flush(10)
    with pytest.raises(NatsClusterError):  # nobody serves "b": the stopped service left no subscription
        client.request("b", timeout=1)


# -- close() from another thread -------------------------------------------------------


def test_close_while_a_handler_runs(
    server: NatsServer, logger: logging.Logger, client: SyncNatsCluster, thread_errors: list[BaseException]
) -> None:
    nats_ = SyncNatsCluster("closing", [server.url], logger)
    busy, release = threading.Event(), threading.Event()

    def handler(msg: Any) -> bytes:
        busy.set()
        release.wait(10)
        return b"late"

    svc = nats_.service("closing", "1.0.0")
    svc.endpoint("slow", handler)
    asking, answer = in_thread(lambda: client.request("slow", timeout=3))
    assert busy.wait(5)
    closing, closed = in_thread(lambda: nats_.close(2))
    time.sleep(0.3)
    release.set()
    closing.join(10)
    asking.join(10)
    assert not closing.is_alive() and closed == [None]
    assert not asking.is_alive()
    # The reply goes if the drain lets it, else the requester times out: never anything else.
    assert isinstance(answer[0], ClusterTimeoutError) or answer[0].data == b"late", answer  # type: ignore[attr-defined]
    assert not svc.running
    svc.stop(1)  # nothing to do once the cluster is closed
    assert thread_errors == []


def test_close_while_discover_waits(
    server: NatsServer, logger: logging.Logger, served: SyncNatsCluster, thread_errors: list[BaseException]
) -> None:
    served.service("found", "1.0.0")
    nats_ = SyncNatsCluster("seeker", [server.url], logger)
    seeking, found = in_thread(lambda: nats_.discover(timeout=5.0))
    time.sleep(0.5)
    nats_.close(2)
    seeking.join(5 + MARGIN)
    assert not seeking.is_alive()
    assert isinstance(found[0], list | ClusterClosedError), found  # never CancelledError
    assert thread_errors == []


# -- a forked child --------------------------------------------------------------------


def test_a_forked_child_can_neither_stop_nor_hang_on_its_parent_s_service_and_runs_its_own(
    served: SyncNatsCluster, client: SyncNatsCluster
) -> None:
    svc = served.service("parent", "1.0.0")
    svc.endpoint("p", lambda msg: b"parent")
    assert client.request("p", timeout=5).data == b"parent"

    def child() -> None:
        assert not svc.running  # its subscriptions belong to the parent
        svc.info()
        svc.stats()
        svc.reset()
        with pytest.raises(ClusterClosedError):  # it would answer here, and not be discovered
            svc.endpoint("late", lambda msg: b"late")
        svc.stop(1)  # touches nothing of the parent's
        mine = served.service("child", "1.0.0")
        mine.endpoint("c", lambda msg: b"child")
        assert served.request("c", timeout=5).data == b"child"
        assert "child" in {i.name for i in served.discover(timeout=0.5)}
        mine.stop(2)
        served.close(2)

    assert run_child(child) == "ok"
    assert svc.running
    assert client.request("p", timeout=5).data == b"parent"  # the parent's service goes on
    assert [i.name for i in client.discover(timeout=0.5)] == ["parent"]


def test_a_child_forked_while_a_parent_thread_held_the_service_s_locks_does_not_hang(
    served: SyncNatsCluster, client: SyncNatsCluster
) -> None:
    svc = served.service("locked", "1.0.0")
    endpoint = svc.endpoint("l", lambda msg: b"l")
    client.request("l", timeout=5)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:  # as a parent thread adding an endpoint, or counting a request, would
        with svc._lock, endpoint._lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    try:

        def child() -> None:
            assert svc.stats()["endpoints"][0]["num_requests"] == 1
            svc.stop(1)
            normal_exit()

        assert run_child(child) == "ok"
    finally:
        release.set()
        holder.join(5)
    assert client.request("l", timeout=5).data == b"l"


# -- dropped without stop() or close() ---------------------------------------------------


def test_a_service_dropped_without_stop_answers_until_its_cluster_closes(
    served: SyncNatsCluster, client: SyncNatsCluster
) -> None:
    svc = served.service("dropped", "1.0.0")
    svc.endpoint("d", lambda msg: b"d", workers=2)
    threads = svc.endpoints[0].subscription.workers  # type: ignore[union-attr]
    del svc
    gc.collect()
    # A running service is like a running thread: dropping it does not stop it.
    assert client.request("d", timeout=5).data == b"d"
    assert [i.name for i in client.discover("dropped", timeout=0.5)] == ["dropped"]
    served.close(5)
    assert not any(t.is_alive() for t in threads)
    assert client.discover("dropped", timeout=0.5) == []


def test_a_cluster_dropped_with_a_live_service_hangs_nothing_and_ends_at_exit(
    server: NatsServer, logger: logging.Logger, client: SyncNatsCluster
) -> None:
    def child() -> None:
        other = SyncNatsCluster("other", [server.url], logger)
        other.serve("o", lambda msg: b"o")
        dropped = SyncNatsCluster("dropped", [server.url], logger)
        dropped.service("orphan", "1.0.0").endpoint("x", lambda msg: b"x")
        del dropped
        gc.collect()
        assert other.request("x", timeout=5).data == b"x"  # the service lives on, as documented
        assert other.request("o", timeout=5).data == b"o"  # the other cluster works
        other.close(2)
        normal_exit()  # the finalizers close what was dropped, within their timeout

    assert run_child(child) == "ok"
    assert client.discover("orphan", timeout=0.5) == []  # gone with the child


# -- a handler raising a BaseException -------------------------------------------------


@pytest.mark.parametrize("fatal", [KeyboardInterrupt, SystemExit])
def test_a_handler_raising_a_base_exception_is_answered_500_counted_and_the_worker_goes_on(
    served: SyncNatsCluster, client: SyncNatsCluster, fatal: type[BaseException], thread_errors: list[BaseException]
) -> None:
    def handler(msg: Any) -> bytes:
        if msg.data == b"die":
            raise fatal("stop")
        return b"ok"

    svc = served.service("fatal", "1.0.0")
    svc.endpoint("f", handler)
    with pytest.raises(ServiceError) as failed:
        client.request("f", b"die", timeout=5)
    assert failed.value.code == 500 and fatal.__name__ in failed.value.description
    assert client.request("f", b"again", timeout=5).data == b"ok"  # the worker lives
    (stats,) = svc.stats()["endpoints"]
    assert (stats["num_requests"], stats["num_errors"]) == (2, 1)
    assert stats["last_error"].startswith(f"500:{fatal.__name__}")
    svc.stop(2)
    assert thread_errors == []
