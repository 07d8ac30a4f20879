"""Key-value and JetStream handles across a fork, and watches and pull subscriptions
dropped without stop()/unsubscribe(): handles bound to the cluster work in a forked child
(through its own connection); a parent's watch or pull subscription raises
SubscriptionClosedError there at once and leaves the parent's consumer alone; nothing
dropped hangs, nothing raises on another thread, and the process's other clusters keep
working. Each child runs with a deadline (tests/test_forksafe.py's ``run_child``)."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from openfactory_nats import ClusterClosedError, SubscriptionClosedError, SyncNatsCluster

from .jspeer import Peer, wait_until
from .servers import NatsServer
from .test_forksafe import normal_exit, run_child

pytestmark = pytest.mark.slow


@pytest.fixture
def nc(jetstream_server: NatsServer, logger: logging.Logger) -> Iterator[SyncNatsCluster]:
    with SyncNatsCluster("life", [jetstream_server.url], logger, reconnect_time_wait=0.1, timeout=5.0) as c:
        yield c


def in_child(body: Callable[[], object], deadline: float = 15.0) -> None:
    """Run *body* in a forked child (then the interpreter's exit finalizers); fail with
    the child's traceback when it raised, or when it did not end within *deadline* s."""
    with tempfile.NamedTemporaryFile(delete=False) as f:
        report = Path(f.name)

    def run() -> None:
        try:
            body()
        except BaseException:
            report.write_text(traceback.format_exc())
            raise
        normal_exit()

    try:
        outcome = run_child(run, deadline)
        assert outcome == "ok", f"the child {outcome}:\n{report.read_text()}"
    finally:
        report.unlink()


# -- fork ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_key_value_and_jetstream_handles_made_in_the_parent_work_in_a_forked_child(
    nc: SyncNatsCluster, peer: Peer
) -> None:
    js = nc.jetstream()
    kv = js.create_key_value("assets", history=5)
    kv.put("a", b"parent")
    js.add_stream("WORK", ["work.>"])

    def child() -> None:
        assert kv.get("a", timeout=5).value == b"parent"
        kv.put("a", b"child", timeout=5)
        assert kv.keys(timeout=5) == ["a"]  # a watch made in the child
        with kv.watch("a", include_history=True, timeout=5) as w:
            assert [w.next(5).value for _ in range(2)] == [b"parent", b"child"]
        assert js.stream_info("WORK", timeout=5).config["subjects"] == ["work.>"]
        assert js.key_value("assets", timeout=5).get("a", timeout=5).value == b"child"
        sub = js.pull_subscribe("work.>", "child", timeout=5)  # a subscription of the child's own
        nc.publish("work.1", b"from the child")
        [msg] = sub.fetch(1, 5)
        msg.ack_sync(5)
        nc.close(5)

    in_child(child)
    assert kv.get("a").value == b"child"  # the parent goes on, on its own connection
    floor = peer.consumer_info("WORK", "child").ack_floor
    assert floor is not None and floor.stream_seq == 1


@pytest.mark.timeout(60)
def test_a_parents_watch_raises_subscription_closed_in_a_child_and_stays_the_parents(
    nc: SyncNatsCluster, peer: Peer
) -> None:
    kv = nc.jetstream().create_key_value("assets")
    kv.put("a", b"1")
    w = kv.watch(">")
    w.wait_caught_up(5)
    consumers = len(peer.run(peer.js.consumers_info("KV_assets")))
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:  # a parent thread holds the queue's lock at the fork
        with w._ready:
            holding.set()
            release.wait(20)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)

    def child() -> None:
        for read in (lambda: w.next(5), lambda: w.wait_caught_up(5)):
            started = time.monotonic()
            with pytest.raises(SubscriptionClosedError, match="forked child"):
                read()
            assert time.monotonic() - started < 2  # at once, not after its timeout
        assert list(w) == []
        w.stop(2)  # nothing to do here: the consumer is the parent's
        with w:
            pass

    try:
        in_child(child)
    finally:
        release.set()
        holder.join(5)
    assert len(peer.run(peer.js.consumers_info("KV_assets"))) == consumers
    rev = kv.put("a", b"2")
    assert w.next(5).value == b"1"
    e = w.next(3)  # less than the heartbeats' 15 s: the consumer was not touched
    assert (e.value, e.revision) == (b"2", rev)
    w.stop()


@pytest.mark.timeout(60)
def test_a_parents_pull_subscription_raises_at_once_in_a_child_and_stays_the_parents(
    nc: SyncNatsCluster, peer: Peer
) -> None:
    js = nc.jetstream()
    js.add_stream("WORK", ["work.>"])
    sub = js.pull_subscribe("work.>")  # ephemeral: unsubscribe deletes it
    fetching = threading.Event()
    outcome: list[object] = []

    def fetch() -> None:  # a parent thread is in a fetch (its turn held) at the fork
        fetching.set()
        outcome.append(sub.fetch(1, 10))

    fetcher = threading.Thread(target=fetch)
    fetcher.start()
    assert fetching.wait(5)
    assert wait_until(lambda: sub._lock.locked(), timeout=5)

    def child() -> None:
        started = time.monotonic()
        with pytest.raises(SubscriptionClosedError, match="forked child"):
            sub.fetch(1, 5)
        assert time.monotonic() - started < 2
        sub.unsubscribe(2)  # must not delete the parent's consumer

    in_child(child)
    assert peer.consumer_info("WORK", sub.consumer).name == sub.consumer
    peer.publish("work.1", b"x")
    fetcher.join(15)
    assert not fetcher.is_alive()
    [msgs] = outcome
    got = msgs if isinstance(msgs, list) and msgs else sub.fetch(1, 5)
    assert [m.data for m in got] == [b"x"]
    got[0].ack_sync(5)
    sub.unsubscribe()


# -- dropped without stop() or unsubscribe() ---------------------------------------------


@pytest.mark.timeout(60)
def test_a_pull_subscription_dropped_without_unsubscribe_leaves_the_clusters_working(
    nc: SyncNatsCluster, peer: Peer, jetstream_server: NatsServer, logger: logging.Logger
) -> None:
    js = nc.jetstream()
    js.add_stream("WORK", ["work.>"])
    peer.publish_many([("work.1", b"0"), ("work.1", b"1")])
    sub = js.pull_subscribe("work.>", "dropped")
    [msg] = sub.fetch(1, 5)
    msg.ack_sync(5)
    ref = weakref.ref(sub)
    del sub, msg
    gc.collect()
    assert ref() is None  # nothing of the library keeps it
    with SyncNatsCluster("other", [jetstream_server.url], logger, timeout=5.0) as other:
        again = other.jetstream().pull_subscribe("work.>", "dropped")
        [msg] = again.fetch(1, 5)
        assert msg.data == b"1"
        msg.ack_sync(5)
    assert peer.stream_info("WORK").state.messages == 2
    started = time.monotonic()
    nc.close(5)
    assert time.monotonic() - started < 5 + 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("with_callback", [False, True])
def test_a_watch_never_stopped_ends_with_its_cluster_and_is_collected(
    with_callback: bool, jetstream_server: NatsServer, logger: logging.Logger
) -> None:
    """A watch never stopped is kept while its cluster is open (a callback watch goes on
    delivering, as a subscription never unsubscribed does); its cluster's close ends its
    thread (it went on remaking the consumer of a closed cluster, for ever), and then it
    is collected with the cluster."""
    cluster = SyncNatsCluster("dropped", [jetstream_server.url], logger, reconnect_time_wait=0.1, timeout=5.0)
    kv = cluster.jetstream().create_key_value("assets")
    seen: list[bytes] = []
    w = kv.watch(">", (lambda e: seen.append(e.value)) if with_callback else None)
    w.wait_caught_up(5)
    monitor = w._monitor
    ref = weakref.ref(w)
    del w
    gc.collect()
    assert ref() is not None  # kept by its thread while the cluster is open
    kv.put("a", b"1")
    if with_callback:
        assert wait_until(lambda: seen == [b"1"], timeout=5)
    with SyncNatsCluster("other", [jetstream_server.url], logger, timeout=5.0) as other:
        assert other.jetstream().key_value("assets").get("a").value == b"1"
    cluster.close(5)
    monitor.join(5)
    assert not monitor.is_alive()
    del kv, cluster  # a closed cluster still held keeps its subscriptions' objects
    gc.collect()
    assert ref() is None


@pytest.mark.timeout(60)
def test_a_cluster_with_live_watches_left_open_at_exit_exits_cleanly(jetstream_server: NatsServer) -> None:
    """A cluster dropped without close() while its watches run (one iterated by a thread
    of the program's): the interpreter's exit closes it, the thread's read ends, nothing
    hangs or raises on another thread."""
    script = textwrap.dedent(
        f"""
        import gc, logging, sys, threading
        from openfactory_nats import SyncNatsCluster, SubscriptionClosedError

        logging.basicConfig(level=logging.WARNING)
        nc = SyncNatsCluster("exit", ["{jetstream_server.url}"], logging.getLogger("exit"), timeout=5.0)
        kv = nc.jetstream().create_key_value("assets")
        kv.put("a", b"1")
        kv.watch(">", lambda e: None).wait_caught_up(5)
        w = kv.watch(">")
        w.wait_caught_up(5)

        def read():
            try:
                for e in w:
                    pass
            except SubscriptionClosedError:
                pass

        threading.Thread(target=read, daemon=True).start()
        del nc, kv, w
        gc.collect()
        other = SyncNatsCluster("other", ["{jetstream_server.url}"], logging.getLogger("other"), timeout=5.0)
        assert other.jetstream().key_value("assets").get("a").value == b"1"
        other.close()
        print("done", flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert "Traceback" not in proc.stderr and "Exception in thread" not in proc.stderr, proc.stderr


@pytest.mark.timeout(60)
def test_a_watch_after_its_cluster_closed_raises_cluster_closed(nc: SyncNatsCluster) -> None:
    kv = nc.jetstream().create_key_value("assets")
    nc.close(5)
    with pytest.raises(ClusterClosedError):
        kv.watch(">", timeout=2)
    with pytest.raises(ClusterClosedError):
        kv.keys(timeout=2)


@pytest.mark.timeout(60)
def test_a_closed_cluster_whose_callback_refers_to_it_is_collected(server: NatsServer, logger: logging.Logger) -> None:
    """What the core holds (a callback that refers to the instance) kept the instance alive
    through its finalizer's arguments, for ever, even after close()."""

    def make() -> weakref.ref[SyncNatsCluster]:
        cluster = SyncNatsCluster("cycle", [server.url], logger, timeout=5.0)
        cluster.subscribe("echo", lambda msg: cluster.publish("echoed", msg.data))
        cluster.close(5)
        return weakref.ref(cluster)

    ref = make()
    gc.collect()
    assert ref() is None
