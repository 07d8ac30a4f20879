"""Routing across three nats-server processes acting as three clusters."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from openfactory_nats import (
    BufferFullError,
    ClusterRouter,
    ConnectError,
    InvalidMessageError,
    SyncClusterRouter,
    WrongThreadError,
    clusters_from_env,
)

from .servers import NatsServer


@pytest.fixture
def three() -> Iterator[dict[str, NatsServer]]:
    servers = {name: NatsServer(name=name) for name in ("C1", "C2", "C3")}
    try:
        for srv in servers.values():
            srv.start()
        yield servers
    finally:
        for srv in servers.values():
            srv.close()


def assets(n: int) -> list[str]:
    return [str(uuid.UUID(int=i * 104729 + 7)) for i in range(n)]


def test_every_asset_reaches_only_its_own_cluster(
    three: dict[str, NatsServer], logger: logging.Logger, subscriber_factory: Any
) -> None:
    subs = {name: subscriber_factory(srv.url, ">") for name, srv in three.items()}
    ids = assets(300)
    with SyncClusterRouter({n: [s.url] for n, s in three.items()}, logger) as router:
        for asset in ids:
            for item in ("Availability", "Temperature"):
                router.publish(asset, f"{asset}.{item}", asset.encode())
        router.flush(10)
        stats = router.stats()
        expected = {name: {a for a in ids if router.cluster_for(a) == name} for name in three}
    assert all(expected.values())  # the 300 assets spread over all three clusters
    for name, sub in subs.items():
        got = sub.wait_for(2 * len(expected[name]))
        assert {m.data.decode() for m in sub.settle()} == expected[name]
        assert len(got) == 2 * len(expected[name])
        assert stats[name]["published"] == 2 * len(expected[name])


def test_a_dead_and_a_stalled_cluster_do_not_slow_the_healthy_one(
    three: dict[str, NatsServer], logger: logging.Logger, subscriber_factory: Any
) -> None:
    healthy = subscriber_factory(three["C3"].url, ">")
    router = SyncClusterRouter(
        {n: [s.url] for n, s in three.items()},
        logger,
        reconnect_time_wait=0.1,
        max_pending_bytes=256 * 1024,
        drain_timeout=0.5,
        timeout=0.3,
    )
    try:
        router.connect()
        ids = assets(600)
        by_cluster = {name: [a for a in ids if router.cluster_for(a) == name] for name in three}
        three["C1"].kill()
        three["C2"].pause()
        refused = {"C1": 0, "C2": 0}
        slowest = 0.0
        for i in range(4000):
            asset = by_cluster["C3"][i % len(by_cluster["C3"])]
            started = time.monotonic()
            router.publish(asset, f"{asset}.n", b"%d" % i)
            slowest = max(slowest, time.monotonic() - started)
            if i % 100 == 0:  # keep the failing clusters under load too
                for name in ("C1", "C2"):
                    try:
                        for asset in by_cluster[name][:50]:
                            router.publish(asset, f"{asset}.n", b"x" * 20_000, timeout=0.05)
                    except BufferFullError:
                        refused[name] += 1
        assert slowest < 0.25  # the 0.3 s timeouts of the failing clusters never show here
        assert refused["C1"] > 0 and refused["C2"] > 0  # buffered, then refused clearly
        got = healthy.wait_for(4000)
        assert [int(m.data) for m in got] == list(range(4000))
        stats = router.stats()
        assert stats["C1"]["refused"] > 0 and stats["C2"]["refused"] > 0 and stats["C3"]["refused"] == 0
        assert stats["C3"]["published"] == 4000
    finally:
        three["C2"].resume()
        router.close(5)


def test_from_env_reads_clusters_and_replicas(logger: logging.Logger) -> None:
    env = {"NATS_CLUSTER_C1": " nats://a:4222, ,nats://b:4222 ", "NATS_CLUSTER_C2": "nats://c:4222", "OTHER": "x"}
    clusters, replicas = clusters_from_env(env)
    assert clusters == {"C1": ["nats://a:4222", "nats://b:4222"], "C2": ["nats://c:4222"]} and replicas == 128
    assert clusters_from_env({**env, "HASH_RING_REPLICAS": "16"})[1] == 16
    for bad in ({}, {"OTHER": "x"}, {"NATS_CLUSTER_C1": " , "}, {**env, "HASH_RING_REPLICAS": "many"}):
        with pytest.raises(InvalidMessageError):
            clusters_from_env(bad)
    router = ClusterRouter.from_env(logger, env={**env, "HASH_RING_REPLICAS": "16"})
    assert set(router.clusters) == {"C1", "C2"} and router.ring.replicas == 16


def test_async_router_routes_and_reports(three: dict[str, NatsServer], logger: logging.Logger) -> None:
    async def main() -> None:
        router = ClusterRouter({n: s.url for n, s in three.items()}, logger)
        await router.connect()
        for asset in assets(60):
            await router.publish(asset, f"{asset}.x", b"1")
        await router.flush(5)
        stats = router.stats()
        await router.close()
        assert sum(s["published"] for s in stats.values()) == 60
        for name, srv in three.items():
            assert srv.monitor("varz")["in_msgs"] == stats[name]["published"]

    asyncio.run(main())


def test_connect_reports_the_failing_cluster(three: dict[str, NatsServer], logger: logging.Logger) -> None:
    three["C2"].kill()
    with SyncClusterRouter({n: s.url for n, s in three.items()}, logger, connect_timeout=0.5) as router:
        with pytest.raises(ConnectError) as info:
            router.connect(timeout=3)
        assert info.value.cluster == "C2"
        assert any("C2" in note for note in info.value.__notes__)
        assert router.clusters["C1"].is_connected and router.clusters["C3"].is_connected


def test_router_refuses_loop_thread_calls_and_works_after_fork(
    three: dict[str, NatsServer], logger: logging.Logger
) -> None:
    with SyncClusterRouter({n: s.url for n, s in three.items()}, logger) as router:
        router.connect()
        outcome: list[BaseException] = []
        loop = router.clusters["C1"].loop
        done = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop)
        done.result(5)

        def on_loop() -> None:
            try:
                router.publish("k", "a", b"x")
            except BaseException as exc:
                outcome.append(exc)

        loop.call_soon_threadsafe(on_loop)
        for _ in range(100):
            if outcome:
                break
            time.sleep(0.01)
        assert outcome and isinstance(outcome[0], WrongThreadError)
        ids = assets(30)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for asset in ids:
                    router.publish(asset, f"{asset}.child", b"c")
                router.flush(5)
                router.close()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        for asset in ids:
            router.publish(asset, f"{asset}.parent", b"p")
        router.flush(5)
    total = sum(srv.monitor("varz")["in_msgs"] for srv in three.values())
    assert total == 60


def test_subscribe_on_the_owning_cluster_and_on_all(three: dict[str, NatsServer], logger: logging.Logger) -> None:
    from openfactory_nats import Msg

    ids = assets(30)
    with SyncClusterRouter({n: s.url for n, s in three.items()}, logger, reconnect_time_wait=0.1) as router:
        owned = router.subscribe(ids[0], f"{ids[0]}.*")
        seen: list[Msg] = []
        everything = router.subscribe_all("*.Availability", callback=seen.append)
        for asset in ids:
            router.publish(asset, f"{asset}.Availability", asset.encode())
        router.flush()
        assert owned.next_msg(5).data == ids[0].encode()
        deadline = time.monotonic() + 10
        while len(seen) < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(m.data.decode() for m in seen) == sorted(ids)
        # one cluster's outage does not stop delivery from the others
        down = router.cluster_for(ids[0])
        three[down].kill()
        alive = [a for a in ids if router.cluster_for(a) != down]
        seen.clear()
        for asset in alive:
            router.publish(asset, f"{asset}.Availability", b"again")
        deadline = time.monotonic() + 10
        while len(seen) < len(alive) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(seen) == len(alive)
        stats = router.stats()
        assert sum(s["received"] for s in stats.values()) >= 30 + len(alive)
    everything.unsubscribe()  # after close: nothing to do, no error


def test_request_and_serve_on_the_owning_cluster(three: dict[str, NatsServer], logger: logging.Logger) -> None:
    from openfactory_nats import NoRespondersError

    ids = assets(6)
    with SyncClusterRouter({n: s.url for n, s in three.items()}, logger) as router:
        for asset in ids:
            router.serve(asset, f"{asset}.state", lambda m, a=asset: f"{a}:{router.cluster_for(a)}".encode())
        for asset in ids:
            reply = router.request(asset, f"{asset}.state", b"", timeout=5)
            assert reply.data == f"{asset}:{router.cluster_for(asset)}".encode()
        # the service of an asset lives on its own cluster only
        other = next(n for n in three if n != router.cluster_for(ids[0]))
        with pytest.raises(NoRespondersError):
            router.clusters[other].request(f"{ids[0]}.state", b"", timeout=5)
