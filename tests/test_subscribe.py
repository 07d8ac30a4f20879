"""Receiving from blocking code against real nats-server processes."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

import nats
import pytest

from openfactory_nats import (
    ClusterTimeoutError,
    InvalidMessageError,
    InvalidTypeError,
    Msg,
    NatsCluster,
    NatsClusterError,
    SubscriptionClosedError,
    SubscriptionModeError,
    SyncNatsCluster,
    WrongThreadError,
)

from .servers import NatsServer


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_callback_runs_in_order_on_its_own_named_thread(server: NatsServer, logger: logging.Logger) -> None:
    got: list[tuple[bytes, str]] = []
    done = threading.Event()
    with SyncNatsCluster("C1", [server.url], logger) as nats:

        def on_message(msg: Msg) -> None:
            got.append((msg.data, threading.current_thread().name))
            if len(got) == 1000:
                done.set()

        sub = nats.subscribe("4a9f0c2e-asset.*", callback=on_message)
        for i in range(1000):
            nats.publish("4a9f0c2e-asset.Availability", b"%d" % i)
        assert done.wait(10)
        assert [int(d) for d, _ in got] == list(range(1000))
        names = {name for _, name in got}
        assert names == {"openfactory-nats-C1-4a9f0c2e-asset.*"}
        assert nats.loop is not None and all(name != "openfactory-nats-C1" for name in names)
        assert sub.delivered == 1000 and sub.dropped == 0
        assert nats.stats()["received"] == 1000


def test_pull_next_msg_iterator_and_context_manager(server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [server.url], logger) as nats:
        with nats.subscribe("jobs.>", queue="workers") as sub:
            with pytest.raises(ClusterTimeoutError) as info:
                sub.next_msg(timeout=0.1)
            assert isinstance(info.value, TimeoutError)
            nats.publish("jobs.a.b", b"1", headers={"K": "v"})
            msg = sub.next_msg(timeout=5)
            assert (msg.subject, msg.data, dict(msg.headers or {}), msg.reply) == ("jobs.a.b", b"1", {"K": "v"}, None)
            with pytest.raises(InvalidMessageError):
                msg.respond(b"no reply subject")
            seen: list[bytes] = []

            def reader() -> None:
                for m in sub:
                    seen.append(m.data)

            thread = threading.Thread(target=reader)
            thread.start()
            for i in range(5):
                nats.publish("jobs.x", b"%d" % i)
            wait_until(lambda: len(seen) == 5)
        thread.join(5)  # leaving the block unsubscribed: the iteration ended
        assert not thread.is_alive() and seen == [b"0", b"1", b"2", b"3", b"4"]
        with pytest.raises(SubscriptionClosedError):
            sub.next_msg(timeout=0.1)
        assert nats.stats()["subscriptions"] == 0


def test_queue_groups_share_the_work(server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [server.url], logger) as nats:
        a = nats.subscribe("work", queue="q")
        b = nats.subscribe("work", queue="q")
        for i in range(400):
            nats.publish("work", b"%d" % i)
        nats.flush()
        got: list[bytes] = []
        for sub in (a, b):
            while True:
                try:
                    got.append(sub.next_msg(timeout=0.3).data)
                except ClusterTimeoutError:
                    break
        assert sorted(int(x) for x in got) == list(range(400))
        assert a.delivered > 0 and b.delivered > 0


def test_a_slow_callback_hurts_only_itself(server: NatsServer, logger: logging.Logger, caplog: Any) -> None:
    fast: list[int] = []
    with SyncNatsCluster("C1", [server.url], logger) as nats:
        release = threading.Event()
        slow = nats.subscribe("t.slow", callback=lambda m: release.wait(5), max_pending_msgs=10)
        nats.subscribe("t.fast", callback=lambda m: fast.append(int(m.data)))
        with caplog.at_level(logging.WARNING, logger=logger.name):
            started = time.monotonic()
            for i in range(2000):
                nats.publish("t.slow", b"x")
                nats.publish("t.fast", b"%d" % i)
            nats.flush()
            assert time.monotonic() - started < 5  # publishing kept its speed
            wait_until(lambda: len(fast) == 2000)
        release.set()
        assert fast == list(range(2000))
        assert slow.dropped >= 1900 and nats.stats()["receive_dropped"] == slow.dropped
        warnings = [r for r in caplog.records if "too slow" in r.getMessage()]
        assert 1 <= len(warnings) <= 2  # rate-limited, not one line per message


def test_callback_errors_are_logged_counted_and_delivery_goes_on(
    server: NatsServer, logger: logging.Logger, caplog: Any
) -> None:
    got: list[bytes] = []

    def on_message(msg: Msg) -> None:
        if msg.data == b"boom":
            raise ValueError("bad message")
        got.append(msg.data)

    with SyncNatsCluster("C1", [server.url], logger) as nats:
        with caplog.at_level(logging.ERROR, logger=logger.name):
            sub = nats.subscribe("e", callback=on_message)
            for data in (b"a", b"boom", b"b"):
                nats.publish("e", data)
            wait_until(lambda: got == [b"a", b"b"])
        assert sub.errors == 1 and nats.stats()["callback_errors"] == 1
        record = next(r for r in caplog.records if r.levelno == logging.ERROR)
        assert "'e'" in record.getMessage() and record.exc_info is not None


def _publish_with_reply(url: str, subject: str, data: bytes, reply: str) -> None:
    async def run() -> None:
        nc = await nats.connect(url)
        try:
            await nc.publish(subject, data, reply=reply)
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(run())


def test_callbacks_may_publish_subscribe_unsubscribe_and_respond(server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [server.url], logger, timeout=5) as cluster:
        events: list[str] = []
        inner: list[Any] = []
        echo = cluster.subscribe("svc.echo", callback=lambda m: m.respond(b"echo:" + m.data))

        def on_message(msg: Msg) -> None:
            cluster.publish("chain.out", msg.data)  # publish
            inner.append(cluster.subscribe("chain.inner"))  # subscribe
            cluster.flush()  # a blocking call
            sub.unsubscribe()  # its own subscription
            events.append("done")

        out = cluster.subscribe("chain.out")
        sub = cluster.subscribe("chain.in", callback=on_message)
        cluster.publish("chain.in", b"go")
        wait_until(lambda: events == ["done"])
        assert out.next_msg(5).data == b"go"
        assert not sub.is_open and inner and inner[0].is_open
        replies = cluster.subscribe("inbox.1")
        _publish_with_reply(server.url, "svc.echo", b"ping", "inbox.1")
        reply = replies.next_msg(5)
        assert reply.data == b"echo:ping"
        cluster.publish("svc.echo", b"no reply subject")  # respond raises: logged, counted
        wait_until(lambda: echo.errors == 1)
        with pytest.raises(ClusterTimeoutError):
            replies.next_msg(0.2)


def test_bad_subscriptions_raise_in_the_caller(server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [server.url], logger) as nats:
        for subject in ("", "a..b", ".a", "a.", "a b", "a.>.b", "a*", "a.\x00", "a\tb"):
            with pytest.raises(InvalidMessageError):
                nats.subscribe(subject)
        for subject in (None, b"a", 1):
            with pytest.raises(InvalidTypeError):
                nats.subscribe(subject)  # type: ignore[arg-type]
        for queue in ("", "a b", "q\n"):
            with pytest.raises(InvalidMessageError):
                nats.subscribe("ok", queue=queue)
        with pytest.raises(InvalidMessageError):
            nats.subscribe("ok", max_pending_msgs=0)
        with pytest.raises(InvalidTypeError):
            nats.subscribe("ok", callback="not callable")  # type: ignore[arg-type]
        pull = nats.subscribe("ok.*")
        with pytest.raises(SubscriptionModeError):
            nats.subscribe("ok.cb", callback=lambda m: None).next_msg(0.1)
        nats.publish("ok.1", b"still works")
        assert pull.next_msg(5).data == b"still works"
        assert nats.stats()["subscriptions"] == 2


@pytest.mark.slow
def test_subscriptions_survive_a_server_restart(server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [server.url], logger, reconnect_time_wait=0.1) as nats:
        sub = nats.subscribe("r.>")
        nats.publish("r.1", b"before")
        assert sub.next_msg(5).data == b"before"
        server.kill()
        server.start()
        wait_until(lambda: nats.is_connected)
        nats.flush(5)  # the subscription is made again before our PING is answered
        nats.publish("r.2", b"after")
        seen = [sub.next_msg(5).data for _ in range(2)]
        # replay is at-least-once: "before" may come again if its PONG was lost with the server
        assert b"after" in seen and set(seen) <= {b"before", b"after"}


@pytest.mark.slow
def test_failover_of_the_clients_node(cluster3: list[NatsServer], logger: logging.Logger) -> None:
    urls = [node.url for node in cluster3]
    with SyncNatsCluster("C1", [urls[0]], logger, reconnect_time_wait=0.1) as nats:
        with SyncNatsCluster("P", [urls[2]], logger) as publisher:
            sub = nats.subscribe("f.>")

            def delivered(tag: bytes) -> bool:
                publisher.publish("f.x", tag)
                try:
                    return sub.next_msg(0.2).data == tag
                except ClusterTimeoutError:
                    return False

            wait_until(lambda: delivered(b"first"))
            cluster3[0].kill()
            wait_until(lambda: nats.is_connected and nats.cluster.nc.connected_url.port != cluster3[0].port)  # type: ignore[union-attr]
            wait_until(lambda: delivered(b"second"), timeout=15)


def test_close_drains_ends_iterators_and_joins_threads(server: NatsServer, logger: logging.Logger) -> None:
    def open_subscribe_close() -> None:
        nats = SyncNatsCluster("leak", [server.url], logger)
        got: list[Msg] = []
        nats.subscribe("c.cb", callback=got.append)
        pull = nats.subscribe("c.pull")
        d = nats.dispatcher(threads=2)
        nats.subscribe("c.shared", callback=got.append, dispatcher=d)
        for i in range(50):
            nats.publish("c.cb", b"%d" % i)
            nats.publish("c.pull", b"%d" % i)
        nats.flush()
        nats.close()
        assert len(got) == 50  # drained before the threads were joined
        assert len(list(pull)) == 50  # what was received stays readable, then the iteration ends
        with pytest.raises(NatsClusterError):
            pull.next_msg(0.1)

    def subscribe_unsubscribe(nats: SyncNatsCluster) -> None:
        sub = nats.subscribe("c.x", callback=lambda m: None)
        sub.unsubscribe()
        sub.unsubscribe()

    open_subscribe_close()
    threads, fds = threading.active_count(), _fd_count()
    for _ in range(30):
        open_subscribe_close()
    with SyncNatsCluster("cycles", [server.url], logger) as nats:
        subscribe_unsubscribe(nats)
        inner = threading.active_count()
        for _ in range(30):
            subscribe_unsubscribe(nats)
        assert threading.active_count() == inner
    wait_until(lambda: threading.active_count() == threads)
    assert _fd_count() == fds


def test_a_thousand_subscriptions_share_four_threads(server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [server.url], logger) as nats:
        before = threading.active_count()
        d = nats.dispatcher(threads=4)
        got: dict[int, list[int]] = {i: [] for i in range(1000)}
        lock = threading.Lock()

        def make(i: int) -> Any:
            def on_message(msg: Msg) -> None:
                with lock:
                    got[i].append(int(msg.data))

            return on_message

        for i in range(1000):
            nats.subscribe(f"asset-{i}.*", callback=make(i), dispatcher=d)
        assert threading.active_count() - before <= 5
        for n in range(5):
            for i in range(1000):
                nats.publish(f"asset-{i}.Temp", b"%d" % n)
        wait_until(lambda: sum(len(v) for v in got.values()) == 5000)
        assert all(v == [0, 1, 2, 3, 4] for v in got.values())


def test_blocking_receive_calls_on_the_loop_thread_are_refused(server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [server.url], logger) as nats:
        sub = nats.subscribe("lt")
        outcomes: list[BaseException | None] = []

        def on_loop() -> None:
            for call in (lambda: nats.subscribe("x"), lambda: sub.next_msg(0.1), sub.unsubscribe):
                try:
                    call()
                    outcomes.append(None)
                except BaseException as exc:
                    outcomes.append(exc)

        nats.loop.call_soon_threadsafe(on_loop)
        wait_until(lambda: len(outcomes) == 3)
        assert all(isinstance(exc, WrongThreadError) for exc in outcomes), outcomes
        nats.publish("lt", b"ok")
        assert sub.next_msg(5).data == b"ok"


def test_forked_child_gets_no_delivery_from_parent_subscriptions(server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [server.url], logger) as nats:
        parent_sub = nats.subscribe("fk")
        nats.publish("fk", b"parent")
        assert parent_sub.next_msg(5).data == b"parent"
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                try:
                    parent_sub.next_msg(0.1)
                except SubscriptionClosedError as exc:
                    assert "parent process" in str(exc)
                    mine = nats.subscribe("fk.child")
                    nats.publish("fk.child", b"child")
                    code = 0 if mine.next_msg(5).data == b"child" else 2
                nats.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        nats.publish("fk", b"again")
        assert parent_sub.next_msg(5).data == b"again"


def test_drain_lets_pending_messages_be_processed(server: NatsServer, logger: logging.Logger) -> None:
    got: list[bytes] = []
    with SyncNatsCluster("C1", [server.url], logger) as nats:
        sub = nats.subscribe("dr", callback=lambda m: (time.sleep(0.002), got.append(m.data)))
        for i in range(200):
            nats.publish("dr", b"%d" % i)
        nats.flush()
        sub.drain(timeout=10)
        assert len(got) == 200 and not sub.is_open
        nats.publish("dr", b"late")
        time.sleep(0.2)
        assert len(got) == 200


def test_async_core_subscribe(server: NatsServer, logger: logging.Logger) -> None:
    async def main() -> None:
        cluster = NatsCluster("C1", [server.url], logger)
        got: list[bytes] = []

        async def on_message(msg: Msg) -> None:
            got.append(msg.data)

        cb = await cluster.subscribe("a.*", on_message)
        pull = await cluster.subscribe("b.>", queue="q")
        with pytest.raises(InvalidMessageError):
            await cluster.subscribe("a..b")
        for i in range(100):
            await cluster.publish("a.x", b"%d" % i)
            await cluster.publish("b.y.z", b"%d" % i)
        await cluster.flush()
        assert [int((await pull.next_msg(5)).data) for _ in range(100)] == list(range(100))
        for _ in range(100):
            if len(got) == 100:
                break
            await asyncio.sleep(0.01)
        assert [int(x) for x in got] == list(range(100))
        with pytest.raises(ClusterTimeoutError):
            await pull.next_msg(0.05)
        await cb.unsubscribe()
        await cluster.close()
        with pytest.raises(SubscriptionClosedError):
            await pull.next_msg(0.05)
        assert cluster.stats()["received"] == 200

    asyncio.run(main())


# The longest subject plus queue group accepted: SUB <subject> <queue> <sid>\r\n in 4096
# bytes, keeping 20 digits for the sid.
_SUB_LINE_ROOM = 4096 - len("SUB ") - 1 - 1 - 20 - len("\r\n")


def test_subject_and_queue_too_long_together_are_refused_in_the_caller(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    """A subject and a queue group that each pass their own check (4000 bytes) can make a
    SUB line longer than the server's control line: subscribe() returned, the server
    closed the connection, and nats-py sent the SUB again on every reconnection."""
    watcher = subscriber_factory(server.url, "c3.after")
    subject = "c3." + "s" * 2997  # 3000 bytes
    with SyncNatsCluster("C3", [server.url], logger, timeout=3.0) as nats:
        nats.connect()
        with pytest.raises(InvalidMessageError, match="control line"):
            nats.subscribe(subject, queue="q" * (_SUB_LINE_ROOM - len(subject) + 1))
        # The longest accepted pair works.
        sub = nats.subscribe(subject, queue="q" * (_SUB_LINE_ROOM - len(subject)))
        nats.publish(subject, b"fits")
        assert sub.next_msg(5).data == b"fits"
        nats.publish("c3.after", b"still works")
        nats.flush(5)
        assert [m.data for m in watcher.wait_for(1, 5)] == [b"still works"]
        stats = nats.stats()
        assert (stats["disconnects"], stats["reconnects"], stats["errors"]) == (0, 0, 0)
        assert stats["subscriptions"] == 1


def test_subject_and_queue_too_long_together_are_refused_by_the_async_core(
    server: NatsServer, logger: logging.Logger
) -> None:
    async def main() -> None:
        cluster = NatsCluster("C3a", [server.url], logger)
        try:
            await cluster.connect()
            subject = "c3a." + "é" * 1000  # 2004 bytes
            with pytest.raises(InvalidMessageError, match="control line"):
                await cluster.subscribe(subject, queue="q" * (_SUB_LINE_ROOM - 2004 + 1))
            await cluster.publish("c3a.x", b"1")
            await cluster.flush(5)
            stats = cluster.stats()
            assert (stats["disconnects"], stats["reconnects"], stats["subscriptions"]) == (0, 0, 0)
        finally:
            await cluster.close()

    asyncio.run(main())
