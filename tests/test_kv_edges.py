"""Edge cases of the key-value store found in review: a conditional write sent again after
a lost connection, a watch made again before it delivered anything, a create racing
another, and what a failed watch leaves behind."""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import nats
import pytest

from openfactory_nats import (
    BucketNotFoundError,
    Entry,
    InvalidMessageError,
    KeyExistsError,
    NatsCluster,
    SyncNatsCluster,
)
from openfactory_nats._jetstream import kv
from openfactory_nats._jetstream.msg import parse_metadata

from .servers import NatsServer, TcpProxy


@pytest.fixture
def nc(jetstream_server: NatsServer, logger: logging.Logger) -> Iterator[SyncNatsCluster]:
    with SyncNatsCluster("kv", [jetstream_server.url], logger, reconnect_time_wait=0.2, timeout=5.0) as c:
        yield c


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _consumers(url: str, stream: str) -> int:
    async def run() -> int:
        conn = await nats.connect(url)
        try:
            return len(await conn.jetstream().consumers_info(stream))
        finally:
            await conn.close()

    return asyncio.run(run())


def _answers_lost(proxy: TcpProxy, reader: SyncNatsCluster, writer: SyncNatsCluster) -> None:
    """What the server sends stops reaching the client; what the client sends still goes."""
    sub = reader.subscribe("poke", lambda m: None)
    with proxy._lock:
        upstream = proxy._conns[1::2]
    proxy._stalled.update(id(s) for s in upstream)
    writer.publish("poke", b"")  # wakes the proxy's thread blocked in recv(): it stalls after
    writer.flush(5)
    time.sleep(0.3)
    del sub


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["create", "update"])
def test_conditional_write_sent_again_after_reconnection_reports_success(
    call: str, nc: SyncNatsCluster, jetstream_server: NatsServer, logger: logging.Logger
) -> None:
    """The write reached the server, its answer was lost with the connection, the request
    path sent it again on the new one: that must not turn into a conflict."""
    kv = nc.jetstream().create_key_value("assets", history=5)
    base = kv.put("k", b"0")
    proxy = TcpProxy(jetstream_server.port)
    try:
        with SyncNatsCluster("r", [proxy.url], logger, reconnect_time_wait=0.2, timeout=15.0) as reader:
            rkv = reader.jetstream().key_value("assets")
            _answers_lost(proxy, reader, nc)
            got: list[Any] = []

            def write() -> None:
                try:
                    if call == "create":
                        got.append(rkv.create("new", b"v", timeout=15))
                    else:
                        got.append(rkv.update("k", b"v", last=base, timeout=15))
                except Exception as exc:
                    got.append(exc)

            t = threading.Thread(target=write)
            t.start()
            key = "new" if call == "create" else "k"

            def stored() -> bool:
                try:
                    return kv.get(key).value == b"v"
                except KeyError:
                    return False

            _wait(stored)
            time.sleep(0.3)
            assert t.is_alive(), got  # its answer did not come
            proxy.cut()
            proxy.restore()
            t.join(30)
            assert got == [kv.get(key).revision]
    finally:
        proxy.close()


@pytest.mark.timeout(60)
def test_updates_only_watch_made_again_before_any_delivery_misses_nothing(
    nc: SyncNatsCluster, jetstream_server: NatsServer
) -> None:
    kv = nc.jetstream().create_key_value("assets")
    kv.put("a", b"old")
    w = kv.watch(">", updates_only=True)
    try:
        w.wait_caught_up(5)
        with w._lock:  # the consumer is lost before it delivered anything; a write comes meanwhile
            nc.request(f"$JS.API.CONSUMER.DELETE.KV_assets.{w._state.consumer}", b"", 5.0)
            rev = kv.put("a", b"during the gap")
            w._reset()
        e = w.next(5)
        assert (e.key, e.value, e.revision) == ("a", b"during the gap", rev)
    finally:
        w.stop()


@pytest.mark.timeout(60)
def test_create_over_a_deleted_key_racing_another_create_is_key_exists(
    nc: SyncNatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = nc.jetstream().create_key_value("assets")
    kv.put("k", b"1")
    kv.delete("k")
    real_get = type(kv).get

    def get_then_other_writer(self: Any, key: str, *args: Any, **kwargs: Any) -> Entry:
        try:
            return real_get(self, key, *args, **kwargs)
        finally:
            monkeypatch.setattr(type(kv), "get", real_get)
            kv.create("k", b"other")  # another writer wins between our get and our write

    monkeypatch.setattr(type(kv), "get", get_then_other_writer)
    with pytest.raises(KeyExistsError):
        kv.create("k", b"mine")
    assert kv.get("k").value == b"other"


@pytest.mark.timeout(60)
def test_async_watch_on_a_missing_bucket_leaves_no_subscription(
    jetstream_server: NatsServer, logger: logging.Logger
) -> None:
    async def main() -> None:
        cluster = NatsCluster("C1", [jetstream_server.url], logger)
        try:
            js = cluster.jetstream()
            await js.create_key_value("assets")
            kv = await js.key_value("assets")
            await js.delete_key_value("assets")
            before = cluster.stats()["subscriptions"]
            with pytest.raises(BucketNotFoundError):
                await kv.watch(">")
            assert cluster.stats()["subscriptions"] == before
        finally:
            await cluster.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_stopped_watches_leave_no_consumer_or_subscription(nc: SyncNatsCluster, jetstream_server: NatsServer) -> None:
    kv = nc.jetstream().create_key_value("assets")
    kv.put("a", b"1")
    before = nc.stats()["subscriptions"]
    for _ in range(3):
        w = kv.watch(">", lambda e: None)
        w.wait_caught_up(5)
        with w._lock:
            w._reset()  # one consumer made again as after a gap
        w.stop()
    kv.keys()
    kv.history("a")
    assert nc.stats()["subscriptions"] == before
    _wait(lambda: _consumers(jetstream_server.url, "KV_assets") == 0)


@pytest.mark.timeout(60)
def test_stop_while_the_consumer_is_being_made_again_leaves_nothing(
    nc: SyncNatsCluster, jetstream_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = nc.jetstream().create_key_value("assets")
    kv.put("a", b"1")
    before = nc.stats()["subscriptions"]
    w = kv.watch(">", lambda e: None)
    w.wait_caught_up(5)
    entered, release = threading.Event(), threading.Event()
    real = nc.request

    def slow_request(subject: str, *args: Any, **kwargs: Any) -> Any:
        if ".CONSUMER.CREATE." in subject:
            entered.set()
            release.wait(10)
        return real(subject, *args, **kwargs)

    monkeypatch.setattr(nc, "request", slow_request)

    def reset() -> None:  # as a subscription's thread after a gap
        with w._lock:
            w._reset()

    t = threading.Thread(target=reset)
    t.start()
    assert entered.wait(5)
    w.stop(5)
    release.set()
    t.join(10)
    monkeypatch.setattr(nc, "request", real)
    _wait(lambda: nc.stats()["subscriptions"] == before)
    _wait(lambda: _consumers(jetstream_server.url, "KV_assets") == 0)


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.KV_B.c_1.1.42.7.1764868371123456789.3",  # v1
        "$JS.ACK.hub.ACCHASH.KV_B.c_1.2.42.7.1764868371123456789.0.rnd",  # v2, with domain and account
        "$JS.ACK._.ACCHASH.KV_B.c_1.1.42.7.1764868371000000000.5",
        "$JS.ACK.KV_B.c_1.x.42.7.1.3",  # an unreadable number
        "$JS.ACK.KV_B.c_1.1.42.7.1",  # too short
        "$JS.NAK.KV_B.c_1.1.42.7.1764868371123456789.3",
        "_INBOX.abc",
        "",
        None,
    ],
)
def test_a_watch_reads_ack_subjects_as_parse_metadata_does(reply: str | None) -> None:
    """The watch's own reader of ``$JS.ACK`` subjects (once per message, without the
    objects parse_metadata makes) agrees with parse_metadata, timestamp included."""
    try:
        meta = parse_metadata(reply)
    except InvalidMessageError:
        assert kv._ack_fields(reply) is None
        return
    got = kv._ack_fields(reply)
    assert got is not None
    consumer, seq, consumer_seq, stamp, pending = got
    assert (consumer, seq, consumer_seq, pending) == (
        meta.consumer,
        meta.sequence.stream,
        meta.sequence.consumer,
        meta.num_pending,
    )
    assert datetime.datetime.fromtimestamp(stamp / 1e9, tz=datetime.UTC) == meta.timestamp
