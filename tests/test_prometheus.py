"""openfactory_nats.prometheus: scraped over HTTP from a real prometheus_client endpoint
while publishing to a real nats-server; the missing extra; fork; weak references."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from openfactory_nats import NatsCluster, SyncClusterRouter, SyncNatsCluster, prometheus
from openfactory_nats._core import registry as _registry

from .servers import NatsServer

Samples = dict[tuple[str, str], float]


def parse(text: str) -> Samples:
    """``{(sample name, cluster): value}`` of the openfactory_nats samples."""
    return {
        (sample.name, sample.labels["cluster"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("openfactory_nats_")
    }


@pytest.fixture
def endpoint() -> Iterator[tuple[CollectorRegistry, str]]:
    """A registry with the collector, served over HTTP on a free loopback port."""
    registry = CollectorRegistry()
    prometheus.register(registry)
    httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield registry, f"http://127.0.0.1:{httpd.server_port}/metrics"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def scrape(url: str) -> tuple[str, Samples]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return text, parse(text)


def test_metrics_over_http_while_publishing(
    server: NatsServer, logger: logging.Logger, endpoint: tuple[CollectorRegistry, str]
) -> None:
    _, url = endpoint
    router_clusters = {"prom-r1": server.url, "prom-r2": server.url}
    with (
        SyncNatsCluster("prom-one", [server.url], logger) as nats,
        SyncClusterRouter(router_clusters, logger) as router,
    ):
        sub = nats.subscribe("prom.one")
        nats.flush()
        done = threading.Event()

        def publish() -> None:
            try:
                for i in range(3000):
                    nats.publish("prom.one", b"%d" % i)
                    router.publish(f"asset-{i % 50}", f"routed.asset-{i % 50}", b"%d" % i)
                    if i % 100 == 99:
                        time.sleep(0.002)  # a few scrapes see the counters on their way
            finally:
                done.set()

        publisher = threading.Thread(target=publish)
        publisher.start()
        seen: list[float] = []
        while True:  # scrape while the publisher runs: the counter only grows
            finished = done.is_set()
            _, samples = scrape(url)
            seen.append(samples.get(("openfactory_nats_published_total", "prom-one"), 0.0))
            if finished:
                break
        publisher.join(30)
        assert seen == sorted(seen)
        nats.flush()
        router.flush()
        received = [sub.next_msg(timeout=10) for _ in range(3000)]
        assert len(received) == 3000
        one, routed = nats.stats(), router.stats()
        text, samples = scrape(url)

    assert "# TYPE openfactory_nats_published_total counter" in text
    assert "# TYPE openfactory_nats_unsent_bytes gauge" in text
    assert samples[("openfactory_nats_published_total", "prom-one")] == 3000
    assert samples[("openfactory_nats_published_bytes_total", "prom-one")] == one["bytes"] > 3000
    assert samples[("openfactory_nats_received_total", "prom-one")] == 3000
    assert samples[("openfactory_nats_subscriptions", "prom-one")] == 1
    assert samples[("openfactory_nats_connected", "prom-one")] == 1
    assert samples[("openfactory_nats_queued_messages", "prom-one")] == 0
    assert samples[("openfactory_nats_dropped_total", "prom-one")] == 0
    # The router's clusters, each under its own name: together every routed message.
    r1 = samples[("openfactory_nats_published_total", "prom-r1")]
    r2 = samples[("openfactory_nats_published_total", "prom-r2")]
    assert (r1, r2) == (routed["prom-r1"]["published"], routed["prom-r2"]["published"])
    assert r1 + r2 == 3000 and r1 > 0 and r2 > 0
    # Every stats() key is exported under the name METRICS gives it.
    for key, value in one.items():
        kind, name, _, _ = prometheus.METRICS[key]
        sample = f"openfactory_nats_{name}_total" if kind == "counter" else f"openfactory_nats_{name}"
        assert samples[(sample, "prom-one")] == value, key


def test_every_stats_key_has_a_metric(logger: logging.Logger) -> None:
    async def main() -> dict[str, int]:
        cluster = NatsCluster("prom-keys", "nats://127.0.0.1:1", logger)
        return cluster.stats()

    keys = set(asyncio.run(main()))
    assert keys == set(prometheus.METRICS), "add the new stats() keys to openfactory_nats.prometheus.METRICS"


def test_instances_sharing_a_name_are_added_up_and_collected_ones_leave(logger: logging.Logger) -> None:
    registry = CollectorRegistry()
    prometheus.register(registry)

    async def main() -> None:
        a = NatsCluster("prom-twins", "nats://127.0.0.1:1", logger)
        b = NatsCluster("prom-twins", "nats://127.0.0.1:1", logger)
        a._stats.add("published", 2)
        b._stats.add("published", 3)
        assert parse(generate_latest(registry).decode())[("openfactory_nats_published_total", "prom-twins")] == 5
        del b
        gc.collect()
        assert parse(generate_latest(registry).decode())[("openfactory_nats_published_total", "prom-twins")] == 2
        del a
        gc.collect()
        assert ("openfactory_nats_published_total", "prom-twins") not in parse(generate_latest(registry).decode())

    asyncio.run(main())


def test_the_registry_does_not_keep_instances_alive(server: NatsServer, logger: logging.Logger) -> None:
    nats = SyncNatsCluster("prom-weak", [server.url], logger)
    nats.publish("weak", b"x")
    core = nats.cluster
    assert core in _registry.live()
    nats.close()
    del nats, core
    gc.collect()
    assert not [c for c in _registry.live() if c.name == "prom-weak"]


def test_register_twice_is_idempotent_and_unregister_stops_the_export(logger: logging.Logger) -> None:
    registry = CollectorRegistry()
    first = prometheus.register(registry)
    assert prometheus.register(registry) is first

    async def main() -> None:
        cluster = NatsCluster("prom-idem", "nats://127.0.0.1:1", logger)
        text = generate_latest(registry).decode()
        assert text.count('openfactory_nats_published_total{cluster="prom-idem"}') == 1
        prometheus.unregister(registry)
        assert "openfactory_nats_" not in generate_latest(registry).decode()
        prometheus.unregister(registry)  # nothing registered: nothing happens
        assert isinstance(prometheus.register(registry), prometheus.ClusterCollector)
        assert "prom-idem" in generate_latest(registry).decode()
        del cluster

    asyncio.run(main())


def test_a_name_taken_by_another_collector_is_refused() -> None:
    class Other:
        def collect(self) -> Iterator[Any]:
            yield CounterMetricFamily("openfactory_nats_published", "someone else's", value=1)

        def describe(self) -> Iterator[Any]:
            return self.collect()

    registry = CollectorRegistry()
    registry.register(Other())
    with pytest.raises(ValueError, match="openfactory_nats_published"):
        prometheus.register(registry)


def test_the_default_registry(logger: logging.Logger) -> None:
    from prometheus_client import REGISTRY

    collector = prometheus.register()
    try:
        assert prometheus.register(None) is collector

        async def main() -> None:
            cluster = NatsCluster("prom-default", "nats://127.0.0.1:1", logger)
            assert 'openfactory_nats_connected{cluster="prom-default"} 0.0' in generate_latest(REGISTRY).decode()
            del cluster

        asyncio.run(main())
    finally:
        prometheus.unregister()
    assert "openfactory_nats_" not in generate_latest(REGISTRY).decode()


def test_without_the_extra_register_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "prometheus_client" or m.startswith("prometheus_client.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'openfactory-nats\[prometheus\]'") as info:
        prometheus.register()
    assert info.value.name == "prometheus_client"
    assert isinstance(info.value.__cause__, ImportError)


def test_without_the_extra_the_library_imports() -> None:
    script = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "import openfactory_nats\n"
        "from openfactory_nats import prometheus\n"
        "try:\n"
        "    prometheus.register()\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.strip() == (
        "openfactory_nats.prometheus needs prometheus_client: pip install 'openfactory-nats[prometheus]'"
    )


def test_a_forked_child_scrapes_only_its_own_instances(server: NatsServer, logger: logging.Logger) -> None:
    registry = CollectorRegistry()
    prometheus.register(registry)
    with SyncNatsCluster("prom-fork", [server.url], logger) as nats:
        for _ in range(10):
            nats.publish("fork", b"parent")
        nats.flush()
        assert parse(generate_latest(registry).decode())[("openfactory_nats_published_total", "prom-fork")] == 10
        pid = os.fork()
        if pid == 0:  # the child: any failure becomes a non-zero exit status
            code = 1
            try:
                assert ("openfactory_nats_published_total", "prom-fork") not in parse(
                    generate_latest(registry).decode()
                )
                for _ in range(3):
                    nats.publish("fork", b"child")
                nats.flush(5)
                samples = parse(generate_latest(registry).decode())
                assert samples[("openfactory_nats_published_total", "prom-fork")] == 3
                assert samples[("openfactory_nats_connected", "prom-fork")] == 1
                nats.close()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert parse(generate_latest(registry).decode())[("openfactory_nats_published_total", "prom-fork")] == 10
