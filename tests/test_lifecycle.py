"""The life cycle's edges against real servers: calls in flight when the connection drops,
calls racing close(), instances nobody closed, recovery after a stall."""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from openfactory_nats import (
    BufferFullError,
    ClusterClosedError,
    ClusterState,
    NatsCluster,
    NatsClusterError,
    SyncNatsCluster,
)
from openfactory_nats._core.lifecycle import Lifecycle, Phase

from .load import publish_until_closed
from .servers import NatsServer, TcpProxy, create_stream, stream_count

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# -- the state machine alone ---------------------------------------------------------
def test_lifecycle_transitions(logger: logging.Logger) -> None:
    shut: list[bool] = []
    life = Lifecycle("C", logger, on_close=lambda: shut.append(True))
    assert life.phase is Phase.NEW and not life.accepting
    assert life.begin_connect() is Phase.NEW and life.phase is Phase.CONNECTING
    life.connect_failed(Phase.NEW)
    assert life.phase is Phase.NEW
    life.begin_connect()
    life.connected()
    assert life.accepting and life.ever_open and life.begin_connect() is None
    assert life.lost() and life.phase is Phase.DISCONNECTED and not life.lost()
    assert life.begin_connect() is Phase.DISCONNECTED
    assert life.begin_close() and not life.begin_close() and shut == [True]
    with pytest.raises(ClusterClosedError):
        life.connected()  # an attempt that ends after close() began is refused
    with pytest.raises(ClusterClosedError):
        life.begin_connect()
    life.closed()
    assert life.phase is Phase.CLOSED and life.closing
    with pytest.raises(RuntimeError):
        life._move(Phase.OPEN)


# -- flush while the connection drops ------------------------------------------------
@pytest.mark.timeout(90)
@pytest.mark.slow
def test_sync_flush_in_flight_when_the_server_dies(server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [server.url], logger, reconnect_time_wait=0.1) as cluster:
        cluster.connect()
        for _ in range(3):
            cluster.publish("a", b"x")
            server.pause()  # the PONG stays outstanding
            outcome: list[BaseException | None] = []

            def flush(outcome: list[BaseException | None] = outcome) -> None:
                try:
                    cluster.flush(8)
                    outcome.append(None)
                except BaseException as exc:
                    outcome.append(exc)

            flusher = threading.Thread(target=flush)
            flusher.start()
            time.sleep(0.3)
            server.kill()
            time.sleep(0.3)
            server.start()
            flusher.join(15)
            assert len(outcome) == 1
            assert outcome[0] is None or isinstance(outcome[0], NatsClusterError), repr(outcome[0])
            cluster.flush(10)  # and the connection works afterwards


@pytest.mark.timeout(90)
@pytest.mark.slow
def test_async_flush_in_flight_when_the_server_dies(server: NatsServer, logger: logging.Logger) -> None:
    async def main() -> None:
        cluster = NatsCluster("C1", [server.url], logger, reconnect_time_wait=0.1)
        await cluster.connect()
        for _ in range(3):
            await cluster.publish("a", b"x")
            server.pause()
            flush = asyncio.ensure_future(cluster.flush(8))
            await asyncio.sleep(0.3)
            server.kill()
            await asyncio.sleep(0.3)
            await asyncio.to_thread(server.start)
            try:
                await flush
            except NatsClusterError:
                pass  # documented; a CancelledError would fail the test
            await cluster.flush(10)
        await cluster.close()

    asyncio.run(main())


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_pings_around_reconnections_never_kill_the_read_loop(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    """A slow link widens the window between nats-py resetting its PONG queue and
    reconnected_cb; confirmation pings and flushes run through it all the time."""
    proxy = TcpProxy(server.port, delay=0.03)
    sub = subscriber_factory(server.url, "w.>")
    sent = 0
    try:
        with SyncNatsCluster("C1", [proxy.url], logger, reconnect_time_wait=0.05, timeout=20) as cluster:
            cluster.connect()
            for _ in range(6):
                for i in range(200):
                    cluster.publish("w.x", b"%d" % sent)
                    sent += 1
                    if i % 50 == 0:
                        time.sleep(0.01)  # let confirmation pings go out
                proxy.cut()
                time.sleep(0.05)
                proxy.restore()
                wait_until(lambda: cluster.is_connected)
                cluster.flush(20)
                reading = cluster.cluster.nc._reading_task  # type: ignore[union-attr]
                assert reading is not None and not reading.done(), "nats-py's read loop died"
            cluster.flush(20)
            stats = cluster.stats()
            assert stats["unsent_bytes"] == 0  # every batch confirmed: nothing piled up
    finally:
        proxy.close()
    got = {int(m.data) for m in sub.settle(quiet=0.5)}
    assert got == set(range(sent))


# -- instances nobody closed ---------------------------------------------------------
def test_an_instance_dropped_without_close_delivers_and_stops_its_thread(
    server: NatsServer, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(server.url, "gc")
    script = textwrap.dedent(
        f"""
        import gc, logging, threading, time
        from openfactory_nats import SyncNatsCluster

        def work():
            cluster = SyncNatsCluster("C1", ["{server.url}"], logging.getLogger("x"))
            for i in range(1000):
                cluster.publish("gc", b"%d" % i)

        before = threading.active_count()
        work()
        gc.collect()
        deadline = time.monotonic() + 10
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert threading.active_count() == before, threading.enumerate()
        print("threads ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "threads ok" in result.stdout
    got = sub.wait_for(1000)
    assert [int(m.data) for m in got] == list(range(1000))


def test_instances_alive_at_exit_deliver_even_in_reference_cycles(server: NatsServer, subscriber_factory: Any) -> None:
    sub = subscriber_factory(server.url, "cyc")
    script = textwrap.dedent(
        f"""
        import logging
        from openfactory_nats import SyncNatsCluster

        class Holder:
            pass

        holder = Holder()
        holder.me = holder  # a cycle: only the collector (or exit) ends it
        holder.cluster = SyncNatsCluster("C1", ["{server.url}"], logging.getLogger("x"))
        for i in range(1000):
            holder.cluster.publish("cyc", b"%d" % i)
        del holder
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30, cwd=ROOT)
    got = sub.wait_for(1000)
    assert [int(m.data) for m in got] == list(range(1000))


def test_a_collected_instance_logs_what_it_could_not_deliver(server: NatsServer, caplog: Any) -> None:
    log = logging.getLogger("test.gc-drop")
    cluster = SyncNatsCluster("GC", [server.url], log, drain_timeout=0.3, timeout=0.5)
    cluster.connect()
    server.pause()
    try:
        for _ in range(200):
            cluster.publish("x", b"y" * 1000)
        with caplog.at_level(logging.ERROR, logger="test.gc-drop"):
            del cluster
            gc.collect()
        assert any("dropped" in r.getMessage() or "could not" in r.getMessage() for r in caplog.records)
    finally:
        server.resume()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["cluster", "router"])
def test_an_instance_collected_on_another_clusters_loop_never_blocks_it(
    kind: str, server: NatsServer, logger: logging.Logger
) -> None:
    """Dropped without close() and collected on another cluster's event-loop thread, with a
    callback still busy: the finalizer must not wait there for the drain. That loop keeps
    its heartbeat; the dropped instance's threads end and its connection closes all the same."""
    from openfactory_nats import SyncClusterRouter

    entered, release = threading.Event(), threading.Event()
    delivered: list[bytes] = []

    def slow(msg: Any) -> None:  # holds up the dropped instance's drain until released
        entered.set()
        release.wait(10)
        delivered.append(msg.data)

    box: list[Any] = []
    if kind == "cluster":
        cluster = SyncNatsCluster("dropped", [server.url], logger)
        box += [cluster, cluster.subscribe("slow", slow)]
        for _ in range(3):
            cluster.publish("slow", b"x")
        cores = [cluster.cluster]
        threads = [cluster._runner.thread, *box[1]._inbox._dispatcher._threads]
        del cluster
    else:
        router = SyncClusterRouter({"dropped": [server.url]}, logger)
        box += [router, router.subscribe_all("slow", slow)]
        for _ in range(3):
            router.publish("k", "slow", b"x")
        cores = [c.cluster for c in router.clusters.values()]
        threads = [router._loop.runner.thread, *box[1]._inbox._dispatcher._threads]
        del router
    assert entered.wait(10)
    with SyncNatsCluster("other", [server.url], logger) as other:
        other.connect()
        beating, stop = threading.Event(), threading.Event()
        worst = [0.0]

        async def heartbeat() -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                worst[0] = max(worst[0], now - last)
                last = now
                beating.set()

        def drop() -> None:  # the last references go on the other loop's thread
            box.clear()
            gc.collect()

        beat = asyncio.run_coroutine_threadsafe(heartbeat(), other.loop)
        assert beating.wait(10)
        other.loop.call_soon_threadsafe(drop)
        wait_until(lambda: not box)
        time.sleep(1.0)  # a finalizer waiting on that loop for the drain would hold it all along
        release.set()
        for thread in threads:
            thread.join(15)
        assert not [t.name for t in threads if t.is_alive()]
        wait_until(lambda: not [t for t in threading.enumerate() if t.name.endswith("-close")])
        stop.set()
        beat.result(5)
        assert worst[0] < 0.5, f"the other cluster's loop was blocked for {worst[0]:.2f} s"
        assert all(core.state is ClusterState.CLOSED for core in cores)
        assert delivered == [b"x"] * 3  # the drain went on, in another thread
        assert other.is_connected


# -- close racing publishes ----------------------------------------------------------
def test_close_with_a_tiny_timeout_after_a_burst(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(server.url, "burst")
    cluster = SyncNatsCluster("C1", [server.url], logger)
    accepted = 0
    for i in range(20000):
        cluster.publish("burst", b"%d" % i)
        accepted += 1
    cluster.close(timeout=0.001)
    assert cluster.state is ClusterState.CLOSED and cluster.cluster.state is ClusterState.CLOSED
    with pytest.raises(ClusterClosedError):
        cluster.publish("burst", b"late")
    stats = cluster.stats()
    got = {int(m.data) for m in sub.settle(quiet=0.5)}
    assert len(got) <= accepted
    assert len(got) + stats["dropped"] >= accepted, (len(got), stats)


@pytest.mark.parametrize("replay", [True, False])
def test_publishes_racing_close_are_delivered_counted_or_refused(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any, replay: bool
) -> None:
    sub = subscriber_factory(server.url, "race.>")
    cluster = SyncNatsCluster("C1", [server.url], logger, replay_unconfirmed=replay)
    cluster.connect()
    accepted, errors = publish_until_closed(cluster, 4, lambda t, n: b"%d" % n, run_for=0.3)
    assert not errors and len(accepted) == 4
    got = sub.settle(quiet=0.5)
    stats = cluster.stats()
    received = len(got)
    total = sum(accepted.values())
    assert received + stats["dropped"] >= total, (received, stats, total)
    for t in range(4):  # what arrived is a prefix, in order, per thread
        seqs = [int(m.data) for m in got if m.subject == f"race.{t}"]
        assert seqs == sorted(seqs)


def test_producers_waiting_for_room_get_closed_error_when_close_starts(
    server: NatsServer, logger: logging.Logger
) -> None:
    cluster = SyncNatsCluster("C1", [server.url], logger, max_pending_bytes=1024 * 1024, drain_timeout=0.3)
    cluster.connect()
    server.pause()
    outcomes: list[tuple[BaseException, float]] = []
    try:
        with pytest.raises(BufferFullError):
            for _ in range(10_000):
                cluster.publish("full", b"x" * 4096, timeout=0.05)

        def waiter() -> None:
            started = time.monotonic()
            try:
                while True:
                    cluster.publish("full", b"x" * 4096, timeout=30)
            except BaseException as exc:
                outcomes.append((exc, time.monotonic() - started))

        threads = [threading.Thread(target=waiter) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        cluster.close(timeout=0.5)
        for thread in threads:
            thread.join(10)
    finally:
        server.resume()
    assert len(outcomes) == 3
    for exc, seconds in outcomes:
        assert isinstance(exc, ClusterClosedError), repr(exc)
        assert seconds < 5


# -- flush and acked publishes under load and outages --------------------------------
@pytest.mark.slow
def test_flush_under_sustained_load_confirms_what_came_before(server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [server.url], logger) as cluster:
        cluster.connect()
        stop = threading.Event()

        def publisher() -> None:
            payload = b"p" * 4096
            while not stop.is_set():
                try:
                    cluster.publish("load", payload, timeout=1)
                except BufferFullError:
                    pass

        threads = [threading.Thread(target=publisher) for _ in range(6)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.3)
            for _ in range(5):
                cluster.flush(5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_an_acked_publish_does_not_overtake_during_an_outage(
    jetstream_server: NatsServer, logger: logging.Logger
) -> None:
    create_stream(jetstream_server.url, "OUT", ["out.>"])
    with SyncNatsCluster("JS", [jetstream_server.url], logger, reconnect_time_wait=0.1) as cluster:
        cluster.connect()
        jetstream_server.kill()
        wait_until(lambda: cluster.state is ClusterState.RECONNECTING)
        for i in range(100):
            cluster.publish("out.x", b"%d" % i)
        result: list[Any] = []
        acker = threading.Thread(target=lambda: result.append(cluster.publish("out.x", b"acked", ack=True, timeout=30)))
        acker.start()
        time.sleep(0.5)
        jetstream_server.start()
        acker.join(40)
        assert result and result[0].seq == 101, result
        cluster.flush(10)
    assert stream_count(jetstream_server.url, "OUT") == 101


def test_acked_publish_maps_size_and_draining_errors(jetstream_server: NatsServer, logger: logging.Logger) -> None:
    from openfactory_nats import InvalidMessageError

    create_stream(jetstream_server.url, "SZ", ["sz.>"])
    with SyncNatsCluster("JS", [jetstream_server.url], logger) as cluster:
        cluster.connect()
        limit = cluster.cluster.max_payload
        # fits with the caller's headers (an 18-byte block), not with Nats-Msg-Id added
        with pytest.raises(InvalidMessageError):
            cluster.publish("sz.x", b"x" * (limit - 19), ack=True, headers={"K": "v"}, timeout=5)
        assert cluster.is_connected  # nothing reached the server, which would have cut us off
        ack = cluster.publish("sz.x", b"x", ack=True, timeout=5)
        assert ack.seq == 1


# -- budget and memory through faults ------------------------------------------------
@pytest.mark.slow
def test_budget_survives_a_client_closed_under_us(server: NatsServer, logger: logging.Logger) -> None:
    cap = 1024 * 1024
    with SyncNatsCluster("C1", [server.url], logger, max_pending_bytes=cap, drain_timeout=0.5) as cluster:
        cluster.connect()
        server.pause()
        with pytest.raises(BufferFullError):
            for _ in range(10_000):
                cluster.publish("b", b"x" * 4096, timeout=0.05)
        core = cluster.cluster
        nc = core.nc
        assert nc is not None
        # nats-py closes its client (as when it gives up reconnecting) while full
        asyncio.run_coroutine_threadsafe(_abort(nc), cluster.loop).result(5)
        wait_until(lambda: core.state is ClusterState.DISCONNECTED)
        server.resume()
        assert cluster.stats()["dropped_bytes"] > 0
        # the whole budget is available again: a cap's worth of messages is accepted
        for _ in range(cap // 4096 // 2):
            cluster.publish("b", b"x" * 4096, timeout=5)
        cluster.flush(10)


async def _abort(nc: Any) -> None:
    from openfactory_nats._natsio import internals

    transport = internals._asyncio_transport(nc)
    assert transport is not None
    transport.abort()  # the stalled server would never take the pending data
    await asyncio.wait_for(nc._close(nc.CLOSED), 5)  # runs closed_cb, like nats-py giving up


# -- public-API fallback, router close, fork ------------------------------------------
def test_public_api_outage_refuses_beyond_the_budget_and_loses_nothing(
    server: NatsServer, logger: logging.Logger, monkeypatch: Any, caplog: Any
) -> None:
    import openfactory_nats._core.outgoing as outgoing_module

    monkeypatch.setenv("OPENFACTORY_NATS_PUBLIC_API", "1")
    monkeypatch.setattr(outgoing_module, "_warned_public_api", False)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        cluster = SyncNatsCluster("P", [server.url], logger, max_pending_bytes=256 * 1024, reconnect_time_wait=0.1)
        SyncNatsCluster("P2", [server.url], logger).close()
    assert sum("public publish API" in r.getMessage() for r in caplog.records) == 1
    with cluster:
        cluster.connect()
        server.kill()
        wait_until(lambda: cluster.state is ClusterState.RECONNECTING)
        accepted = 0
        with pytest.raises(BufferFullError):
            for i in range(10_000):
                cluster.publish("pub.x", b"%06d" % i + b"x" * 1000, timeout=0.05)
                accepted += 1
        server.start()
        cluster.flush(10)
        assert cluster.stats()["dropped"] == 0
        # the restarted server counts from 0: everything accepted during the outage arrived
        assert server.monitor("varz")["in_msgs"] == accepted


def test_router_close_from_many_threads_waits_and_refuses_the_loop_thread(
    server: NatsServer, logger: logging.Logger
) -> None:
    from openfactory_nats import SyncClusterRouter, WrongThreadError

    router = SyncClusterRouter({"C1": [server.url], "C2": [server.url]}, logger)
    router.connect()
    refused: list[BaseException] = []

    def on_loop() -> None:
        try:
            router.close()
        except BaseException as exc:
            refused.append(exc)

    router.clusters["C1"].loop.call_soon_threadsafe(on_loop)
    wait_until(lambda: bool(refused))
    assert isinstance(refused[0], WrongThreadError)
    router.publish("k", "a", b"x")
    seen: list[bool] = []

    def closer() -> None:
        router.close()
        seen.append(all(c.state is ClusterState.CLOSED for c in router.clusters.values()))

    threads = [threading.Thread(target=closer) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen == [True] * 5


def test_locks_held_by_parent_threads_do_not_block_a_forked_child(server: NatsServer, logger: logging.Logger) -> None:
    import os

    from openfactory_nats._blocking.loop import INHERITED

    with SyncNatsCluster("C1", [server.url], logger) as cluster:
        cluster.connect()
        core = cluster.cluster
        locks = [core._stats._lock, core._pump.outbox._cond, core._life._lock]
        for lock in locks:
            lock.acquire()  # as if a parent thread held them at the moment of fork
        try:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    for _ in range(3):
                        grandchild = os.fork()
                        if grandchild == 0:
                            os._exit(0 if len(INHERITED) <= 1 else 3)
                        os.waitpid(grandchild, 0)
                    core.stats()
                    core._pump.outbox.release(1)
                    core._life.lost()
                    cluster.publish("fork", b"child")
                    cluster.flush(5)
                    code = 0 if len(INHERITED) == 1 else 2
                    cluster.close()
                finally:
                    os._exit(code)
        finally:
            for lock in locks:
                lock.release()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not INHERITED  # the parent keeps nothing of its own


def test_a_loop_that_ends_during_connect_leaves_the_cluster_usable(
    silent_server: Any, server: NatsServer, logger: logging.Logger
) -> None:
    cluster = NatsCluster("C1", [silent_server.url], logger, connect_timeout=5)

    async def give_up() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(cluster.connect(), 0.3)  # the attempt is cut off with its loop

    asyncio.run(give_up())
    cluster.servers = [server.url]

    async def again() -> None:
        await cluster.publish("again", b"x")
        await cluster.flush(5)
        await cluster.close()

    asyncio.run(again())
    assert cluster.state is ClusterState.CLOSED and cluster.stats()["published"] == 1
