"""The key-value store against a real JetStream server, with nats-py's own async KV on the
other side: every call, conflicts, history, watches (initial values then updates, from
threads, across a cut connection and a server restart), bad keys."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import nats
import pytest

from openfactory_nats import (
    BucketNotFoundError,
    ClusterTimeoutError,
    Entry,
    InvalidMessageError,
    InvalidTypeError,
    JetStreamError,
    KeyExistsError,
    KeyNotFoundError,
    NatsCluster,
    NatsClusterError,
    RevisionMismatchError,
    StreamNotFoundError,
    SubscriptionClosedError,
    SubscriptionModeError,
    SyncClusterRouter,
    SyncNatsCluster,
)

from .servers import NatsServer, TcpProxy


@pytest.fixture
def nc(jetstream_server: NatsServer, logger: logging.Logger) -> Iterator[SyncNatsCluster]:
    with SyncNatsCluster("kv", [jetstream_server.url], logger, reconnect_time_wait=0.2, timeout=5.0) as c:
        yield c


def _py(url: str, coro: Any) -> Any:
    """Run ``coro(kv)`` on nats-py's own async KV of the bucket ``assets``."""

    async def main() -> Any:
        conn = await nats.connect(url)
        try:
            kv = await conn.jetstream().key_value("assets")
            return await coro(kv)
        finally:
            await conn.close()

    return asyncio.run(main())


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.timeout(60)
def test_every_call_interoperates_with_nats_py(nc: SyncNatsCluster, jetstream_server: NatsServer) -> None:
    js = nc.jetstream()
    kv = js.create_key_value("assets", history=5, storage="memory")
    assert js.create_key_value("assets", history=5, storage="memory").bucket == "assets"  # same config: bound
    rev = kv.put("a1.temp", b"21.5")
    assert kv.put("a1.temp", b"21.5") == rev + 1  # identical puts are two revisions (no de-duplication)
    e = kv.get("a1.temp")
    assert (e.key, e.value, e.revision, e.operation, e.bucket) == ("a1.temp", b"21.5", rev + 1, "PUT", "assets")
    assert e.created.tzinfo is not None and abs(e.created.timestamp() - time.time()) < 60
    assert kv.get("a1.temp", revision=rev).revision == rev

    async def read(pkv: Any) -> Any:
        got = await pkv.get("a1.temp")
        await pkv.put("a1.py", b"from nats-py")
        return got.value, got.revision

    assert _py(jetstream_server.url, read) == (b"21.5", rev + 1)
    assert kv.get("a1.py").value == b"from nats-py"
    assert js.key_value("assets").get("a1.py").value == b"from nats-py"

    marker = kv.delete("a1.py")
    with pytest.raises(KeyNotFoundError) as info:
        kv.get("a1.py")
    assert isinstance(info.value, KeyError) and isinstance(info.value, NatsClusterError)
    assert (info.value.revision, info.value.operation, info.value.key) == (marker, "DEL", "a1.py")
    kv.purge("a1.temp")
    with pytest.raises(KeyNotFoundError):
        kv.get("a1.temp")
    assert [h.operation for h in kv.history("a1.temp")] == ["PURGE"]  # the rollup dropped the rest

    async def deleted(pkv: Any) -> Any:
        import nats.js.errors

        try:
            await pkv.get("a1.py")
        except nats.js.errors.KeyNotFoundError:
            return True
        return False

    assert _py(jetstream_server.url, deleted)
    with pytest.raises(KeyNotFoundError):
        kv.get("never")

    js.delete_key_value("assets")
    with pytest.raises(BucketNotFoundError) as gone:
        js.key_value("assets")
    assert isinstance(gone.value, StreamNotFoundError) and gone.value.bucket == "assets"
    with pytest.raises(BucketNotFoundError):
        js.delete_key_value("assets")
    with pytest.raises(BucketNotFoundError):
        kv.get("a1.temp")


@pytest.mark.timeout(60)
def test_bucket_made_by_nats_py_without_direct_get(nc: SyncNatsCluster, jetstream_server: NatsServer) -> None:
    async def make() -> None:
        conn = await nats.connect(jetstream_server.url)
        try:
            pkv = await conn.jetstream().create_key_value(bucket="assets", history=3)
            await pkv.put("k", b"v1")
            await pkv.put("k", b"v2")
        finally:
            await conn.close()

    asyncio.run(make())
    kv = nc.jetstream().key_value("assets")
    assert kv.get("k").value == b"v2"
    assert [e.value for e in kv.history("k")] == [b"v1", b"v2"]
    with pytest.raises(KeyNotFoundError):
        kv.get("nope")


@pytest.mark.timeout(60)
def test_create_and_update_conflicts(nc: SyncNatsCluster) -> None:
    kv = nc.jetstream().create_key_value("assets")
    rev = kv.create("a1.mode", b"auto")
    with pytest.raises(KeyExistsError) as exists:
        kv.create("a1.mode", b"other")
    assert isinstance(exists.value, RevisionMismatchError) and exists.value.err_code == 10071
    new = kv.update("a1.mode", b"manual", last=rev)
    with pytest.raises(RevisionMismatchError) as moved:
        kv.update("a1.mode", b"late", last=rev)
    assert (moved.value.key, moved.value.last) == ("a1.mode", rev)
    assert not isinstance(moved.value, KeyExistsError)
    with pytest.raises(RevisionMismatchError):
        kv.delete("a1.mode", last=rev)
    kv.delete("a1.mode", last=new)
    again = kv.create("a1.mode", b"back")  # create over a delete marker
    assert kv.get("a1.mode").revision == again
    kv.purge("a1.mode")
    assert kv.create("a1.mode", b"after purge") > again
    assert kv.get("a1.mode").value == b"after purge"


@pytest.mark.timeout(60)
def test_history_is_oldest_first_and_bounded_keys_filtered(nc: SyncNatsCluster) -> None:
    kv = nc.jetstream().create_key_value("assets", history=3)
    revs = [kv.put("a1.temp", b"%d" % i) for i in range(5)]
    kv.put("a1.mode", b"auto")
    kv.put("a2.temp", b"1")
    kv.put("a2.gone", b"1")
    kv.delete("a2.gone")
    hist = kv.history("a1.temp")
    assert [e.value for e in hist] == [b"2", b"3", b"4"]
    assert [e.revision for e in hist] == revs[2:]
    assert kv.history("nothing") == []
    assert kv.keys() == ["a1.mode", "a1.temp", "a2.temp"]
    assert kv.keys("a1.*") == ["a1.mode", "a1.temp"]
    assert kv.keys("*.temp") == ["a1.temp", "a2.temp"]
    assert nc.jetstream().create_key_value("empty").keys() == []


@pytest.mark.timeout(90)
def test_watch_sees_initial_values_then_updates_from_4_threads(nc: SyncNatsCluster) -> None:
    kv = nc.jetstream().create_key_value("assets", history=2)
    for i in range(20):
        kv.put(f"a{i}.temp", b"initial")
    kv.put("other.x", b"not watched")
    seen: list[Entry] = []
    threads: set[str] = set()
    running = [0]
    overlap = [False]

    def on_entry(e: Entry) -> None:
        running[0] += 1
        overlap[0] |= running[0] > 1
        threads.add(threading.current_thread().name)
        seen.append(e)
        running[0] -= 1

    w = kv.watch("a*.temp".replace("a*", "*"), on_entry)
    w.wait_caught_up(10)
    assert w.caught_up
    assert sorted(e.key for e in seen) == sorted(f"a{i}.temp" for i in range(20))
    assert all(e.value == b"initial" for e in seen)

    def writer(t: int) -> None:
        for n in range(100):
            kv.put(f"a{(t * 5) + n % 5}.temp", b"%d-%d" % (t, n))

    ws = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in ws:
        t.start()
    for t in ws:
        t.join(60)
    last = max(kv.get(f"a{i}.temp").revision for i in range(20))
    _wait(lambda: w.revision >= last)
    w.stop()
    revisions = [e.revision for e in seen]
    assert revisions == sorted(set(revisions))  # revision order, none twice
    assert len(seen) == 20 + 400
    final = {e.key: e.value for e in seen}
    assert final == {f"a{i}.temp": kv.get(f"a{i}.temp").value for i in range(20)}
    assert not overlap[0]
    assert threading.main_thread().name not in threads and not any("loop" in n for n in threads)


@pytest.mark.timeout(60)
def test_watch_deletes_iteration_and_options(nc: SyncNatsCluster) -> None:
    kv = nc.jetstream().create_key_value("assets", history=5)
    kv.put("k1", b"a")
    kv.put("k1", b"b")
    kv.put("k2", b"x")
    kv.delete("k2")
    w = kv.watch(">")
    got = [w.next(5), w.next(5)]
    assert [(e.key, e.value, e.operation) for e in got] == [("k1", b"b", "PUT"), ("k2", b"", "DEL")]
    w.wait_caught_up(5)
    kv.purge("k1")
    e = w.next(5)
    assert (e.key, e.operation) == ("k1", "PURGE")
    with pytest.raises(ClusterTimeoutError):
        w.next(0.2)
    w.stop()
    w.stop()  # idempotent
    with pytest.raises(SubscriptionClosedError):
        w.next(1)
    assert list(w) == []

    with kv.watch(">", include_history=True) as h:
        h.wait_caught_up(5)
        # the purge's rollup dropped k1's earlier revisions
        assert [(x.key, x.operation) for x in [h.next(1) for _ in range(3)]] == [
            ("k2", "PUT"),
            ("k2", "DEL"),
            ("k1", "PURGE"),
        ]
    kv.put("k3", b"new")
    with kv.watch(">", ignore_deletes=True) as live:
        live.wait_caught_up(5)
        assert [x.key for x in [live.next(1)]] == ["k3"]
        kv.delete("k3")
        kv.put("k4", b"4")
        assert live.next(5).key == "k4"
    with kv.watch(">", updates_only=True) as new:
        new.wait_caught_up(1)  # at once
        kv.put("k5", b"5")
        assert new.next(5).key == "k5"
    with kv.watch("k5", lambda e: None) as cb:
        with pytest.raises(SubscriptionModeError):
            cb.next(1)
    empty = nc.jetstream().create_key_value("empty").watch()
    empty.wait_caught_up(2)  # an empty bucket is caught up at once
    empty.stop()


@pytest.mark.timeout(60)
def test_watch_on_shared_dispatcher_and_callback_errors(nc: SyncNatsCluster) -> None:
    kv = nc.jetstream().create_key_value("assets")
    d = nc.dispatcher(2)
    got: list[int] = []

    def bad(e: Entry) -> None:
        got.append(e.revision)
        if e.value == b"boom":
            raise RuntimeError("handler bug")

    w = kv.watch(">", bad, dispatcher=d)
    w.wait_caught_up(5)
    kv.put("k", b"boom")
    kv.put("k", b"ok")
    _wait(lambda: len(got) == 2)
    assert w.errors == 1
    w.stop()
    d.close()


def _check_no_gap(revisions: list[int], last: int) -> None:
    assert revisions == list(range(1, last + 1)), f"missed or repeated: {revisions}"


@pytest.mark.timeout(120)
def test_watch_across_a_cut_connection(jetstream_server: NatsServer, logger: logging.Logger) -> None:
    proxy = TcpProxy(jetstream_server.port)
    writer = SyncNatsCluster("w", [jetstream_server.url], logger, timeout=5.0)
    try:
        kv = writer.jetstream().create_key_value("assets", history=10)
        with SyncNatsCluster("r", [proxy.url], logger, reconnect_time_wait=0.2, timeout=5.0) as reader:
            seen: list[int] = []
            w = reader.jetstream().key_value("assets").watch(">", lambda e: seen.append(e.revision))
            w.wait_caught_up(5)
            last = 0
            for round_ in range(3):
                for i in range(30):
                    last = kv.put(f"k{i % 7}", b"%d" % i)
                    if i == 10:
                        proxy.cut()  # the rest is written while the watch is cut off
                proxy.restore()
                _wait(lambda round_=round_: reader.stats()["reconnects"] > round_, 20)
                _wait(lambda last=last: w.revision >= last, 20)
                _wait(lambda round_=round_: w.resets > round_, 20)  # made again after the reconnection
            for i in range(10):
                last = kv.put(f"k{i}", b"last")
            _wait(lambda: w.revision >= last, 20)
            w.stop()
            _check_no_gap(seen, last)
    finally:
        writer.close()
        proxy.close()


@pytest.mark.timeout(120)
def test_watch_across_a_server_restart(jetstream_server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("r", [jetstream_server.url], logger, reconnect_time_wait=0.2, timeout=5.0) as nc:
        kv = nc.jetstream().create_key_value("assets", history=10)
        for i in range(10):
            kv.put(f"k{i}", b"before")
        seen: list[int] = []
        w = kv.watch(">", lambda e: seen.append(e.revision), include_history=True)
        w.wait_caught_up(5)
        jetstream_server.restart()
        _wait(lambda: nc.stats()["reconnects"] >= 1, 20)
        last = 0
        deadline = time.monotonic() + 30
        while True:  # JetStream takes a moment to be back after the restart
            try:
                last = kv.put("k0", b"after")
                break
            except NatsClusterError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        for i in range(20):
            last = kv.put(f"k{i % 4}", b"after %d" % i)
        _wait(lambda: w.revision >= last, 30)
        w.stop()
        _check_no_gap(seen, last)


def test_bad_keys_values_and_names_raise_in_the_caller(nc: SyncNatsCluster) -> None:
    js = nc.jetstream()
    kv = js.create_key_value("assets")
    for key in ["", "a b", "a.*", "a.>", ".a", "a.", "a..b", "ü"]:
        with pytest.raises(InvalidMessageError):
            kv.put(key, b"x")
        with pytest.raises(InvalidMessageError):
            kv.get(key)
    for flt in ["", "a*", "a.>.b", ".a", "a b"]:
        with pytest.raises(InvalidMessageError):
            kv.watch(flt)
    with pytest.raises(InvalidTypeError):
        kv.put(5, b"x")  # type: ignore[arg-type]
    with pytest.raises(InvalidTypeError):
        kv.put("k", "text")  # type: ignore[arg-type]
    assert kv.put("k", bytearray(b"ok")) > 0
    with pytest.raises(InvalidTypeError):
        kv.update("k", b"x", last="1")  # type: ignore[arg-type]
    for bucket in ["", "a.b", "a b", "KV>"]:
        with pytest.raises(InvalidMessageError):
            js.create_key_value(bucket)
    with pytest.raises(InvalidMessageError):
        js.create_key_value("h", history=65)
    with pytest.raises(InvalidMessageError):
        js.create_key_value("h", colour="blue")
    with pytest.raises(BucketNotFoundError):
        kv.watch(">").stop() if False else js.key_value("nope")


def test_no_jetstream_is_a_jetstream_error(server: NatsServer, logger: logging.Logger) -> None:
    with SyncNatsCluster("plain", [server.url], logger, timeout=2.0) as c:
        with pytest.raises(JetStreamError) as info:
            c.jetstream().create_key_value("assets")
        assert info.value.code == 503


@pytest.mark.timeout(60)
def test_async_key_value(jetstream_server: NatsServer, logger: logging.Logger) -> None:
    async def main() -> None:
        cluster = NatsCluster("C1", [jetstream_server.url], logger)
        try:
            js = cluster.jetstream()
            kv = await js.create_key_value("assets", history=4)
            rev = await kv.put("a1.temp", b"1")
            assert (await kv.get("a1.temp")).revision == rev
            with pytest.raises(KeyExistsError):
                await kv.create("a1.temp", b"2")
            with pytest.raises(RevisionMismatchError):
                await kv.update("a1.temp", b"2", last=rev + 5)
            await kv.update("a1.temp", b"2", last=rev)
            seen: list[Entry] = []

            async def on(e: Entry) -> None:
                seen.append(e)

            w = await kv.watch(">", on)
            await w.wait_caught_up(5)
            await kv.delete("a1.temp")
            with pytest.raises(KeyNotFoundError):
                await kv.get("a1.temp")
            await kv.put("a2.temp", b"x")
            for _ in range(200):
                if len(seen) == 3:
                    break
                await asyncio.sleep(0.02)
            assert [(e.key, e.operation) for e in seen] == [("a1.temp", "PUT"), ("a1.temp", "DEL"), ("a2.temp", "PUT")]
            await w.stop()
            assert await kv.keys() == ["a2.temp"]
            assert [e.value for e in await kv.history("a1.temp")] == [b"1", b"2", b""]
            it = await kv.watch("a2.*")
            assert (await it.next(5)).key == "a2.temp"
            await it.stop()
            assert [e async for e in it] == []
            await js.delete_key_value("assets")
            with pytest.raises(BucketNotFoundError):
                await js.key_value("assets")
        finally:
            await cluster.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_router_key_value(jetstream_server: NatsServer, logger: logging.Logger) -> None:
    with SyncClusterRouter({"C1": [jetstream_server.url]}, logger) as router:
        router.jetstream("asset-1").create_key_value("assets")
        kv = router.key_value("asset-1", "assets")
        kv.put("asset-1.mode", b"auto")
        assert kv.get("asset-1.mode").value == b"auto"
        with pytest.raises(BucketNotFoundError):
            router.key_value("asset-1", "nope")


@pytest.mark.timeout(60)
def test_cli_get_put_del_watch(jetstream_server: NatsServer, nc: SyncNatsCluster) -> None:
    from .test_cli import run

    url = jetstream_server.url
    bucket = nc.jetstream().create_key_value("assets", history=5)
    result = run(["kv", "put", "assets", "a1.temp", "21.5", "--servers", url])
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == bucket.get("a1.temp").revision
    assert run(["kv", "put", "assets", "a1.mode", "--servers", url], stdin=b"auto").returncode == 0
    result = run(["kv", "get", "assets", "a1.temp", "--servers", url])
    assert (result.returncode, result.stdout) == (0, b"21.5\n")
    assert run(["kv", "del", "assets", "a1.mode", "--servers", url]).returncode == 0
    result = run(["kv", "get", "assets", "a1.mode", "--servers", url])
    assert result.returncode == 1 and b"deleted" in result.stderr and b"Traceback" not in result.stderr
    result = run(["kv", "watch", "assets", "a1.*", "--count", "2", "--history", "--timeout", "10", "--servers", url])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("[a1.temp] #1 PUT 21.5") and lines[1].startswith("[a1.mode] #2 PUT auto")
    result = run(["kv", "get", "nope", "k", "--servers", url])
    assert result.returncode == 1 and b"no key-value bucket" in result.stderr
    assert run(["kv", "get", "assets", "--servers", url]).returncode == 2
    assert run(["kv", "put", "assets", "bad key", "x", "--servers", url]).returncode == 2
