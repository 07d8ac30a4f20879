"""The asyncio core against real nats-server processes."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from openfactory_nats import (
    BufferFullError,
    ClusterClosedError,
    ClusterState,
    ConnectError,
    ConnectTimeoutError,
    InvalidMessageError,
    InvalidTypeError,
    NatsCluster,
)

from .servers import NatsServer, SilentServer, TcpProxy, free_port


async def wait_state(cluster: NatsCluster, state: ClusterState, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cluster.state is state:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{cluster!r} did not reach {state} within {timeout} s")


@pytest.fixture(params=["fast", "public-api"])
def api_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "public-api":
        monkeypatch.setenv("OPENFACTORY_NATS_PUBLIC_API", "1")
    return str(request.param)


def test_messages_arrive_in_order(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any, api_mode: str
) -> None:
    sub = subscriber_factory(server.url, "asset.>")

    async def main() -> None:
        cluster = NatsCluster("C1", [server.url], logger)
        assert cluster._fast is (api_mode == "fast")
        assert cluster.nc is None and cluster.state is ClusterState.NEW
        await cluster.connect()
        assert cluster.is_connected and cluster.state is ClusterState.CONNECTED
        for i in range(1000):
            await cluster.publish("asset.1.ID", b"%d" % i, headers={"Seq": str(i)} if i % 100 == 0 else None)
        await cluster.flush(5)
        await cluster.close()
        assert cluster.state is ClusterState.CLOSED
        assert cluster.stats()["published"] == 1000

    asyncio.run(main())
    got = sub.wait_for(1000)
    assert [m.data for m in got] == [b"%d" % i for i in range(1000)]
    assert got[100].headers == {"Seq": "100"}
    assert all(m.subject == "asset.1.ID" for m in got)


def test_publish_connects_lazily(server: NatsServer, logger: logging.Logger, subscriber_factory: Any) -> None:
    sub = subscriber_factory(server.url, "lazy")

    async def main() -> None:
        cluster = NatsCluster("C1", server.url, logger)
        await cluster.publish("lazy", b"x")
        assert cluster.nc is not None
        await cluster.close()

    asyncio.run(main())
    assert [m.data for m in sub.wait_for(1)] == [b"x"]


def test_unreachable_cluster_fails_within_deadline(logger: logging.Logger) -> None:
    url = f"nats://alice:s3cret@127.0.0.1:{free_port()}"

    async def main() -> None:
        cluster = NatsCluster("C9", [url], logger, reconnect_time_wait=0.1, connect_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(ConnectTimeoutError) as info:
            await cluster.publish("a.b", b"x")
        elapsed = time.monotonic() - started
        assert elapsed < 2.5
        assert isinstance(info.value, RuntimeError) and isinstance(info.value, TimeoutError)
        assert "C9" in str(info.value) and info.value.cluster == "C9"
        assert "s3cret" not in str(info.value) and "alice:***@" in str(info.value)
        assert "s3cret" not in repr(cluster)
        await cluster.close()

    asyncio.run(main())


def test_silent_server_connect_times_out(silent_server: SilentServer, logger: logging.Logger) -> None:
    async def main() -> None:
        cluster = NatsCluster("C1", [silent_server.url], logger, connect_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(ConnectError):
            await cluster.connect()
        assert time.monotonic() - started < 2.5
        assert cluster.state in (ClusterState.NEW, ClusterState.DISCONNECTED)
        await cluster.close()

    asyncio.run(main())


def test_ten_concurrent_connects_make_one_connection(server: NatsServer, logger: logging.Logger) -> None:
    async def main() -> None:
        cluster = NatsCluster("C1", [server.url], logger)
        await asyncio.gather(*(cluster.connect() for _ in range(10)))
        connz = server.monitor("connz")
        assert connz["num_connections"] == 1
        assert connz["connections"][0]["name"] == "C1"
        await cluster.close()

    asyncio.run(main())


def test_partition_buffers_then_delivers_in_order(
    server: NatsServer, proxy: TcpProxy, logger: logging.Logger, subscriber_factory: Any, api_mode: str
) -> None:
    sub = subscriber_factory(server.url, "part")

    async def main() -> None:
        cluster = NatsCluster("C1", [proxy.url], logger, reconnect_time_wait=0.1)
        await cluster.connect()
        client = cluster.nc
        for i in range(100):
            await cluster.publish("part", b"%d" % i)
        await cluster.flush(5)
        proxy.cut()
        for _ in range(200):
            if cluster.state is ClusterState.RECONNECTING:
                break
            await asyncio.sleep(0.01)
        assert cluster.state is ClusterState.RECONNECTING
        started = time.monotonic()
        for i in range(100, 200):
            await cluster.publish("part", b"%d" % i)
        assert time.monotonic() - started < 0.5  # buffered, not blocked
        await cluster.connect()  # a no-op: never tear down a reconnecting client
        assert cluster.nc is client
        await asyncio.sleep(0.5)
        proxy.restore()
        await cluster.flush(10)
        assert cluster.nc is client
        assert cluster.stats()["reconnects"] >= 1
        await cluster.close()

    asyncio.run(main())
    got = sub.wait_for(200)
    assert [m.data for m in got] == [b"%d" % i for i in range(200)]


def test_full_reconnect_buffer_is_a_clear_error(server: NatsServer, proxy: TcpProxy, logger: logging.Logger) -> None:
    async def main() -> None:
        cluster = NatsCluster("C1", [proxy.url], logger, reconnect_time_wait=0.1, max_pending_bytes=64 * 1024)
        await cluster.connect()
        proxy.cut()
        await wait_state(cluster, ClusterState.RECONNECTING)
        with pytest.raises(BufferFullError) as info:
            for _ in range(1000):
                await cluster.publish("full", b"x" * 1000)
        assert isinstance(info.value, TimeoutError)
        assert "buffer full" in str(info.value) and info.value.capacity == 64 * 1024
        assert cluster.stats()["refused"] == 1
        proxy.restore()
        await cluster.flush(10)
        await cluster.publish("full", b"after")  # room again once delivered
        await cluster.close()

    asyncio.run(main())


def test_close_is_bounded_with_a_stalled_server(server: NatsServer, logger: logging.Logger) -> None:
    async def main() -> None:
        cluster = NatsCluster("C1", [server.url], logger, drain_timeout=1.0)
        await cluster.connect()
        server.pause()
        try:
            for _ in range(50):
                await cluster.publish("stall", b"x" * 100_000)
            started = time.monotonic()
            await cluster.close()
            assert time.monotonic() - started < 3.0
            assert cluster.state is ClusterState.CLOSED
        finally:
            server.resume()

    asyncio.run(main())


def test_flush_to_a_stalled_server_times_out(server: NatsServer, logger: logging.Logger) -> None:
    async def main() -> None:
        cluster = NatsCluster("C1", [server.url], logger, drain_timeout=0.5)
        await cluster.connect()
        server.pause()
        try:
            await cluster.publish("stall", b"x")
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await cluster.flush(0.5)
            assert time.monotonic() - started < 1.5
        finally:
            server.resume()
        await cluster.flush(5)
        await cluster.close()

    asyncio.run(main())


def test_close_while_reconnecting_ends_closed(server: NatsServer, logger: logging.Logger) -> None:
    async def main() -> None:
        cluster = NatsCluster("C1", [server.url], logger, reconnect_time_wait=0.1, drain_timeout=0.5)
        await cluster.connect()
        await cluster.publish("x", b"1")
        await cluster.flush(5)
        server.kill()
        await wait_state(cluster, ClusterState.RECONNECTING)
        await cluster.publish("x", b"lost")
        started = time.monotonic()
        await asyncio.gather(cluster.close(), cluster.close(), cluster.close())
        assert time.monotonic() - started < 2.5
        assert cluster.state is ClusterState.CLOSED
        assert cluster.stats()["dropped"] == 1  # reported, not silent
        await cluster.close()

    asyncio.run(main())


def test_use_after_close_is_refused(server: NatsServer, logger: logging.Logger) -> None:
    async def main() -> None:
        cluster = NatsCluster("C1", [server.url], logger)
        await cluster.connect()
        await cluster.close()
        await cluster.close()
        for call in (cluster.connect(), cluster.publish("a", b"x"), cluster.flush(1)):
            with pytest.raises(ClusterClosedError, match="C1"):
                await call
        assert isinstance(ClusterClosedError("x"), RuntimeError)

    asyncio.run(main())


def test_client_closed_for_good_is_replaced(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(server.url, "again")

    async def main() -> None:
        cluster = NatsCluster("C1", [server.url], logger)
        await cluster.connect()
        first = cluster.nc
        assert first is not None
        await first.close()
        assert cluster.state is ClusterState.DISCONNECTED
        await cluster.publish("again", b"x")
        assert cluster.nc is not first and cluster.is_connected
        await cluster.flush(5)
        await cluster.close()

    asyncio.run(main())
    assert [m.data for m in sub.wait_for(1)] == [b"x"]


BAD_SUBJECTS: list[tuple[object, type[Exception]]] = [
    (b"bytes.subject", InvalidTypeError),
    (None, InvalidTypeError),
    (42, InvalidTypeError),
    ("", InvalidMessageError),
    (" ", InvalidMessageError),
    ("a b", InvalidMessageError),
    ("a\tb", InvalidMessageError),
    ("a\r\nPUB x 1", InvalidMessageError),
    ("a\x00b", InvalidMessageError),
    ("a..b", InvalidMessageError),
    (".a", InvalidMessageError),
    ("a.", InvalidMessageError),
    ("a.*", InvalidMessageError),
    ("a.>", InvalidMessageError),
    ("*", InvalidMessageError),
    ("x" * 5000, InvalidMessageError),
]
BAD_PAYLOADS: list[tuple[object, type[Exception]]] = [
    ("text", InvalidTypeError),
    (None, InvalidTypeError),
    (12, InvalidTypeError),
    ([1, 2], InvalidTypeError),
    (b"x" * (1024 * 1024 + 1), InvalidMessageError),
]


def test_bad_input_is_refused_and_nothing_reaches_the_server(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(server.url, ">")

    async def main() -> None:
        cluster = NatsCluster("C1", [server.url], logger)
        await cluster.connect()
        for subject, error in BAD_SUBJECTS:
            with pytest.raises(error):
                await cluster.publish(subject, b"x")  # type: ignore[arg-type]
        for payload, error in BAD_PAYLOADS:
            with pytest.raises(error):
                await cluster.publish("ok", payload)  # type: ignore[arg-type]
        for headers in ({"Bad Key": "v"}, {"k": "a\r\nb"}, {"k": 1}, ["k"]):
            with pytest.raises((InvalidMessageError, InvalidTypeError)):
                await cluster.publish("ok", b"x", headers=headers)  # type: ignore[arg-type]
        await cluster.publish("ok", bytearray(b"ba"))
        await cluster.publish("ok", memoryview(b"mv"))
        await cluster.flush(5)
        await cluster.close()

    asyncio.run(main())
    got = sub.settle()
    assert [(m.subject, m.data) for m in got] == [("ok", b"ba"), ("ok", b"mv")]
    assert server.monitor("varz")["in_msgs"] == 2


def test_logging_names_the_cluster_and_nats_py_stays_quiet(
    server: NatsServer, logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        cluster = NatsCluster("C7", [server.url], logger, reconnect_time_wait=0.1)
        await cluster.connect()
        server.kill()
        await wait_state(cluster, ClusterState.RECONNECTING)
        await asyncio.sleep(0.3)
        server.start()
        for _ in range(300):
            if cluster.is_connected:
                break
            await asyncio.sleep(0.02)
        assert cluster.is_connected
        await cluster.close()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    ours = [r for r in caplog.records if r.name == logger.name]
    text = [r.getMessage() for r in ours]
    assert all("C7" in t for t in text)
    assert any("connected to nats://127.0.0.1" in t for t in text)
    assert any("disconnected" in t for t in text)
    assert any("reconnected to" in t for t in text)
    assert any("closed" in t for t in text)
    assert not [r for r in caplog.records if r.name.startswith("nats")]


def test_constructor_rejects_bad_configuration(logger: logging.Logger) -> None:
    with pytest.raises(InvalidMessageError):
        NatsCluster("C1", [], logger)
    with pytest.raises(InvalidTypeError):
        NatsCluster("", ["nats://127.0.0.1:4222"], logger)
    with pytest.raises(InvalidMessageError):
        NatsCluster("C1", ["nats://127.0.0.1:4222"], logger, max_reconnect_attempts=3)
    with pytest.raises(InvalidMessageError):
        NatsCluster("C1", ["nats://127.0.0.1:4222"], logger, connect_timeout=-1)
    cluster = NatsCluster("C1", "nats://127.0.0.1:4222", logger)
    assert cluster.servers == ["nats://127.0.0.1:4222"] and cluster.reconnect_time_wait == 2
    assert cluster.nc is None and isinstance(cluster._conn.lock, asyncio.Lock)


def test_a_buffer_dropped_by_nats_py_is_counted_and_logged(
    server: NatsServer, logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        cluster = NatsCluster("C1", [server.url], logger, drain_timeout=0.5)
        await cluster.connect()
        server.pause()
        try:
            for _ in range(20):
                await cluster.publish("drop", b"x" * 50_000)
            await asyncio.sleep(0.1)
            assert cluster.nc is not None
            asyncio.get_running_loop().create_task(cluster.nc.close())  # nats-py gives up on its own
            await wait_state(cluster, ClusterState.DISCONNECTED)
            assert cluster.stats()["dropped_bytes"] > 0
        finally:
            server.resume()
        await cluster.close()

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert any(r.levelno == logging.ERROR and "dropped" in r.getMessage() for r in caplog.records)


def test_the_reference_usage_with_one_event_loop_per_call(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    """The original's documentation runs each call in its own ``asyncio.run``."""
    sub = subscriber_factory(server.url, "asset.>")
    cluster = NatsCluster(name="C1", servers=[server.url], logger=logger)
    asyncio.run(cluster.connect())
    asyncio.run(cluster.publish("asset.123", b"payload"))
    asyncio.run(cluster.publish("asset.124", b"payload"))
    asyncio.run(cluster.close())
    assert [m.subject for m in sub.wait_for(2)] == ["asset.123", "asset.124"]
    assert cluster.state is ClusterState.CLOSED and cluster.stats()["dropped"] == 0
