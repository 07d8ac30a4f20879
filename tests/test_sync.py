"""The blocking facade against real nats-server processes."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from openfactory_nats import (
    BufferFullError,
    ClusterClosedError,
    ClusterState,
    ConnectError,
    InvalidMessageError,
    InvalidTypeError,
    SyncNatsCluster,
    WrongThreadError,
)

from .servers import NatsServer, SilentServer, create_stream, free_port

ROOT = Path(__file__).resolve().parent.parent


def test_sixteen_threads_deliver_everything_in_order(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(server.url, "t.>")
    with SyncNatsCluster("C1", [server.url], logger) as cluster:

        def worker(t: int) -> None:
            for i in range(500):
                cluster.publish(f"t.{t}", b"%d" % i)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(worker, range(16)))
        cluster.flush(10)
        assert cluster.stats()["published"] == 8000
    got = sub.wait_for(8000)
    assert len(got) == 8000
    for t in range(16):
        assert [int(m.data) for m in got if m.subject == f"t.{t}"] == list(range(500))


def test_properties_and_state(server: NatsServer, logger: logging.Logger) -> None:
    cluster = SyncNatsCluster("C1", [server.url], logger)
    assert cluster.name == "C1" and cluster.state is ClusterState.NEW and not cluster.is_connected
    assert cluster.loop.is_running()
    cluster.connect()
    assert cluster.is_connected and cluster.cluster.nc is not None
    assert cluster.cluster.name == "C1"
    thread = [t for t in threading.enumerate() if t.name == "openfactory-nats-C1"]
    assert len(thread) == 1 and thread[0].daemon
    cluster.close()
    assert cluster.state is ClusterState.CLOSED and not thread[0].is_alive()


def test_publish_after_close_is_refused_and_close_is_thread_safe(server: NatsServer, logger: logging.Logger) -> None:
    cluster = SyncNatsCluster("C1", [server.url], logger)
    cluster.publish("a", b"x")
    errors: list[BaseException] = []

    def closer() -> None:
        try:
            cluster.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=closer) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    cluster.close()
    for call in (lambda: cluster.publish("a", b"x"), cluster.connect, cluster.flush):
        with pytest.raises(ClusterClosedError, match="C1"):
            call()


def test_connect_to_a_silent_server_times_out(silent_server: SilentServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [silent_server.url], logger, connect_timeout=5.0) as cluster:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            cluster.connect(timeout=0.5)
        assert time.monotonic() - started < 1.5
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            cluster.publish("a", b"x", timeout=0.5)
        assert time.monotonic() - started < 1.5


def test_unreachable_cluster_raises_runtime_error(logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [f"nats://127.0.0.1:{free_port()}"], logger, connect_timeout=0.5) as cluster:
        with pytest.raises(RuntimeError) as info:
            cluster.publish("a", b"x")
        assert isinstance(info.value, ConnectError)


def test_flush_to_a_stalled_server_times_out(server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [server.url], logger, drain_timeout=0.5) as cluster:
        cluster.connect()
        server.pause()
        try:
            cluster.publish("a", b"x")
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                cluster.flush(timeout=0.5)
            assert time.monotonic() - started < 2.0
        finally:
            server.resume()
        cluster.flush(5)


def test_full_buffer_waits_then_refuses(server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [server.url], logger, max_pending_bytes=4 * 1024 * 1024, drain_timeout=0.5) as cluster:
        cluster.connect()
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(BufferFullError, match="buffer full"):
                for _ in range(100):
                    cluster.publish("big", b"x" * 500_000, timeout=0.3)
            assert 0.25 < time.monotonic() - started < 5
            assert cluster.stats()["refused"] == 1
        finally:
            server.resume()
        cluster.flush(10)
        cluster.publish("big", b"x" * 500_000, timeout=5)


def test_bad_input_raises_in_the_caller_and_leaves_it_working(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(server.url, ">")
    with SyncNatsCluster("C1", [server.url], logger) as cluster:
        for subject in (None, b"a", "", "a b", "a..b", "a.*", "a.>"):
            with pytest.raises((ValueError, TypeError)):
                cluster.publish(subject, b"x")  # type: ignore[arg-type]
        cluster.connect()
        for payload in ("s", None, 1.5, [1]):
            with pytest.raises(InvalidTypeError):
                cluster.publish("ok", payload)  # type: ignore[arg-type]
        with pytest.raises(InvalidMessageError):
            cluster.publish("ok", b"x" * (1024 * 1024 + 1))
        for timeout in (-1, float("nan"), float("inf")):
            with pytest.raises(ValueError):
                cluster.publish("ok", b"x", timeout=timeout)
        for timeout in ("1", True, [1]):
            with pytest.raises(TypeError):
                cluster.publish("ok", b"x", timeout=timeout)  # type: ignore[arg-type]
        with pytest.raises(InvalidMessageError):
            cluster.publish("ok", b"x", headers={"a:b": "c"})
        cluster.publish("ok", b"fine", headers={"K": "v"})
        cluster.flush(5)
    got = sub.settle()
    assert [(m.subject, m.data, m.headers) for m in got] == [("ok", b"fine", {"K": "v"})]


def test_blocking_calls_on_the_loop_thread_are_refused(server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("C1", [server.url], logger) as cluster:
        cluster.connect()
        outcomes: dict[str, BaseException | None] = {}
        done = threading.Event()

        def on_loop() -> None:
            calls = {
                "publish": lambda: cluster.publish("a", b"x"),
                "connect": cluster.connect,
                "flush": cluster.flush,
                "close": cluster.close,
            }
            for name, call in calls.items():
                try:
                    call()
                    outcomes[name] = None
                except BaseException as exc:
                    outcomes[name] = exc
            done.set()

        cluster.loop.call_soon_threadsafe(on_loop)
        assert done.wait(5)
        for name, exc in outcomes.items():
            assert isinstance(exc, WrongThreadError), name
            assert isinstance(exc, RuntimeError) and "event loop thread" in str(exc)
        cluster.publish("a", b"still works")
        cluster.flush(5)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_open_close_cycles_leak_no_thread_and_no_fd(server: NatsServer, logger: logging.Logger) -> None:
    def cycle() -> None:
        with SyncNatsCluster("leak", [server.url], logger) as cluster:
            cluster.publish("a", b"x")
            cluster.flush(5)

    cycle()
    gc.collect()
    threads, fds = threading.active_count(), _fd_count()
    for _ in range(20):
        cycle()
    gc.collect()
    assert threading.active_count() == threads
    assert _fd_count() == fds


def test_forked_child_publishes_through_the_parents_instance(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(server.url, "fork")
    with SyncNatsCluster("C1", [server.url], logger) as cluster:
        cluster.publish("fork", b"parent-1")
        cluster.flush(5)
        pid = os.fork()
        if pid == 0:  # the child: any failure becomes a non-zero exit status
            code = 1
            try:
                assert cluster.state is ClusterState.NEW
                for i in range(100):
                    cluster.publish("fork", b"child-%d" % i)
                cluster.flush(5)
                cluster.close()
                code = 0
            finally:
                os._exit(code)
        for i in range(100):
            cluster.publish("fork", b"parent-%d" % (i + 2))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        cluster.flush(5)
        assert cluster.is_connected
    got = sub.wait_for(201)
    assert len(got) == 201
    parent = [m.data for m in got if m.data.startswith(b"parent")]
    child = [m.data for m in got if m.data.startswith(b"child")]
    assert parent == [b"parent-%d" % i for i in range(1, 102)]
    assert child == [b"child-%d" % i for i in range(100)]
    connz = server.monitor("connz?state=closed")
    assert connz["num_connections"] >= 1  # the child's own connection came and went


def test_interpreter_exit_flushes_what_is_queued(server: NatsServer, subscriber_factory: Any) -> None:
    sub = subscriber_factory(server.url, "exit")
    script = textwrap.dedent(
        f"""
        import logging
        from openfactory_nats import SyncNatsCluster
        cluster = SyncNatsCluster("C1", ["{server.url}"], logging.getLogger("x"))
        for i in range(5000):
            cluster.publish("exit", b"%d" % i)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30, cwd=ROOT)
    got = sub.wait_for(5000)
    assert [int(m.data) for m in got] == list(range(5000))


@pytest.mark.slow
def test_gunicorn_preload_deployment(server: NatsServer, logger: logging.Logger, subscriber_factory: Any) -> None:
    sub = subscriber_factory(server.url, "assets.*")  # the POSTs, not the state requests
    port = free_port()
    env = dict(os.environ, NATS_URL=server.url, LOG_LEVEL="WARNING")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--preload", "-w", "2", "--threads", "4", "-b", f"127.0.0.1:{port}",
         "examples.flask_app:app"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def state(msg: Any) -> bytes:
        asset = msg.subject.split(".")[1]
        if asset == "slow":
            time.sleep(3)  # past the app's 2 s timeout
        return b"state of " + asset.encode()

    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            except urllib.error.HTTPError:
                break  # 404 from Flask: the workers are serving
            except OSError:
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.1)

        def post(i: int) -> tuple[int, int]:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/assets/a{i % 10}", data=b"%d" % i, method="POST")
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status), int(json.loads(resp.read())["pid"])

        def get(asset: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/assets/{asset}/state", timeout=10) as resp:
                    return int(resp.status), resp.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        with ThreadPoolExecutor(8) as pool:
            posted = list(pool.map(post, range(200)))
        assert [status for status, _ in posted] == [202] * 200
        got = sub.wait_for(200, timeout=15)
        assert sorted(int(m.data) for m in got) == list(range(200))

        # /metrics: each scrape reaches one worker, which counts what it published itself
        # (the core it made after the fork), not what the other worker or the master did.
        per_worker = Counter(pid for _, pid in posted)
        expected = set(per_worker.values()) | ({None} if len(per_worker) < 2 else set())
        for _ in range(10):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            assert "# TYPE openfactory_nats_published_total counter" in text
            match = re.search(r'^openfactory_nats_published_total\{cluster="web"\} (\S+)$', text, re.M)
            assert (int(float(match.group(1))) if match else None) in expected, (text, per_worker)

        # Request/reply from the forked workers' threads, to a service in this process.
        assert get("a1")[0] == 503  # nobody serves yet: no responders
        with SyncNatsCluster("service", [server.url], logger) as service:
            service.serve("assets.*.state", state, workers=4)
            assets = [f"a{i}" for i in range(50)]
            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(get, assets))
            assert replies == [(200, b"state of " + a.encode()) for a in assets]
            assert get("slow")[0] == 504
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_an_acked_publish_follows_the_same_threads_earlier_publishes(
    jetstream_server: NatsServer, logger: logging.Logger
) -> None:
    create_stream(jetstream_server.url, "ORDER", ["order.>"])
    with SyncNatsCluster("JS", [jetstream_server.url], logger) as cluster:
        for i in range(1000):
            cluster.publish("order.x", b"%d" % i)
        ack = cluster.publish("order.x", b"acked", ack=True, msg_id="order-1")
        assert (ack.stream, ack.seq, ack.duplicate) == ("ORDER", 1001, False)
        again = cluster.publish("order.x", b"acked", ack=True, msg_id="order-1")
        assert again.duplicate and again.seq == 1001
        assert cluster.stats()["acked"] == 2
