"""The asyncio JetStream handle (``NatsCluster.jetstream()``) and the routers'
``jetstream(asset)``, against real JetStream servers, with nats-py on the other side."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import nats
import pytest

from openfactory_nats import (
    AsyncJsMsg,
    ClusterRouter,
    ConsumerNotFoundError,
    InvalidMessageError,
    MsgAlreadyAckedError,
    NatsCluster,
    StreamNotFoundError,
    SyncClusterRouter,
)

from .servers import NatsServer


async def _publish(url: str, subject: str, count: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for i in range(count):
            await js.publish(subject, b"m%d" % i)
    finally:
        await nc.close()


async def _consumer(url: str, stream: str, name: str) -> Any:
    nc = await nats.connect(url)
    try:
        return await nc.jetstream().consumer_info(stream, name)
    finally:
        await nc.close()


@pytest.mark.timeout(60)
def test_streams_fetch_and_acks(jetstream_server: NatsServer, logger: logging.Logger) -> None:
    url = jetstream_server.url

    async def main() -> None:
        cluster = NatsCluster("a", [url], logger)
        try:
            js = cluster.jetstream()
            info = await js.add_stream("CMDS", ["cmds.>"], "memory", max_msgs=1000)
            assert info.name == "CMDS" and info.config["storage"] == "memory"
            assert (await js.update_stream("CMDS", max_msgs=500)).config["max_msgs"] == 500
            await _publish(url, "cmds.x", 10)
            assert (await js.stream_info("CMDS")).messages == 10
            sub = await js.pull_subscribe("cmds.>", "w", ack_wait=5.0)
            first = await sub.fetch(4, 2.0)
            assert [m.data for m in first] == [b"m%d" % i for i in range(4)]
            assert isinstance(first[0], AsyncJsMsg)
            assert first[0].metadata.sequence.stream == 1 and first[0].metadata.num_delivered == 1
            for m in first:
                await m.ack()
            with pytest.raises(MsgAlreadyAckedError):
                await first[0].ack()
            rest = await sub.fetch(100, 2.0)
            assert len(rest) == 6
            await rest[0].nak()  # redelivered at once
            await rest[1].term()
            for m in rest[2:]:
                await m.ack_sync(5.0)
            again = await sub.fetch(10, 2.0)
            assert [m.data for m in again] == [b"m4"] and again[0].metadata.num_delivered == 2
            await again[0].ack_sync()
            assert await sub.fetch(10, 0.3) == []
            info_c = await _consumer(url, "CMDS", "w")
            assert info_c.num_ack_pending == 0 and info_c.num_pending == 0
            await sub.unsubscribe()
            await js.delete_consumer("CMDS", "w")
            with pytest.raises(ConsumerNotFoundError):
                await js.consumer_info("CMDS", "w")
            await js.delete_stream("CMDS")
            with pytest.raises(StreamNotFoundError):
                await js.stream_info("CMDS")
            with pytest.raises(StreamNotFoundError):
                await js.pull_subscribe("nothing.>", "w")
            with pytest.raises(InvalidMessageError):
                await js.pull_subscribe("cmds.>", "bad.name")
        finally:
            await cluster.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_async_consume_with_coroutine_handlers(jetstream_server: NatsServer, logger: logging.Logger) -> None:
    url = jetstream_server.url

    async def main() -> None:
        cluster = NatsCluster("a", [url], logger)
        try:
            js = cluster.jetstream()
            await js.add_stream("JOBS", ["jobs.>"])
            await _publish(url, "jobs.a", 200)
            seen: dict[bytes, int] = {}

            async def handler(msg: AsyncJsMsg) -> None:
                seen[msg.data] = seen.get(msg.data, 0) + 1
                if msg.data.endswith(b"7") and msg.metadata.num_delivered == 1:
                    raise RuntimeError("first delivery fails")

            pool = await js.consume("jobs.>", handler, "pool", workers=3, ack_wait=5.0)
            for _ in range(200):
                if sum(1 for d in seen if seen[d] >= (2 if d.endswith(b"7") else 1)) == 200:
                    break
                await asyncio.sleep(0.05)
            await pool.stop()
            assert len(seen) == 200
            assert pool.failed == 20 and pool.processed == 200
            assert cluster.stats()["js_failed"] == 20 and cluster.stats()["js_processed"] == 200
            info = await _consumer(url, "JOBS", "pool")
            assert info.num_ack_pending == 0 and info.num_pending == 0
        finally:
            await cluster.close()

    asyncio.run(main())


@pytest.fixture
def two_js(tmp_path: Any) -> Iterator[dict[str, NatsServer]]:
    servers = {name: NatsServer(name=name, jetstream=True, store_dir=str(tmp_path / name)) for name in ("C1", "C2")}
    try:
        for srv in servers.values():
            srv.start()
        yield servers
    finally:
        for srv in servers.values():
            srv.close()


@pytest.mark.timeout(60)
def test_routers_give_the_owning_cluster_s_jetstream(two_js: dict[str, NatsServer], logger: logging.Logger) -> None:
    clusters = {name: [srv.url] for name, srv in two_js.items()}
    with SyncClusterRouter(clusters, logger) as router:
        for asset in ("asset-1", "asset-2", "asset-3", "asset-4"):
            js = router.jetstream(asset)
            name = router.cluster_for(asset)
            assert js.cluster_name == name
            stream = f"S_{asset.replace('-', '_')}"
            js.add_stream(stream, [f"{asset}.>"])
            router.publish(asset, f"{asset}.x", b"hello")
            router.flush()
            got = js.pull_subscribe(f"{asset}.>", "d").fetch(1, 2.0)
            assert [m.data for m in got] == [b"hello"]
            got[0].ack()
            # the stream is on the owning cluster only
            others = [n for n in clusters if n != name]
            for other in others:
                assert stream not in asyncio.run(_stream_names(two_js[other].url))

    async def with_async_router() -> None:
        router = ClusterRouter(clusters, logger)
        try:
            js = router.jetstream("asset-1")
            assert (await js.stream_info("S_asset_1")).messages == 1
        finally:
            await router.close()

    asyncio.run(with_async_router())


async def _stream_names(url: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        return list(
            await nc.jetstream().streams_info() and [s.config.name for s in await nc.jetstream().streams_info()]
        )
    finally:
        await nc.close()
