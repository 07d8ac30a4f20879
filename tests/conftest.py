from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from .servers import NatsServer, SilentServer, Subscriber, TcpProxy, free_port


@pytest.fixture
def logger() -> logging.Logger:
    log = logging.getLogger("test.openfactory_nats")
    log.setLevel(logging.DEBUG)
    return log


@pytest.fixture
def server() -> Iterator[NatsServer]:
    srv = NatsServer(name="single")
    try:
        yield srv.start()
    finally:
        srv.close()


@pytest.fixture
def jetstream_server(tmp_path) -> Iterator[NatsServer]:  # type: ignore[no-untyped-def]
    srv = NatsServer(name="js", jetstream=True, store_dir=str(tmp_path / "store"))
    try:
        yield srv.start()
    finally:
        srv.close()


@pytest.fixture
def cluster3() -> Iterator[list[NatsServer]]:
    """Three nats-server processes forming one cluster through routes."""
    ports = [free_port() for _ in range(3)]
    nodes = [
        NatsServer(name=f"node{i}", cluster_port=ports[i], routes=[p for j, p in enumerate(ports) if j != i])
        for i in range(3)
    ]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.close()


@pytest.fixture
def proxy(server: NatsServer) -> Iterator[TcpProxy]:
    p = TcpProxy(server.port)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    s = SilentServer()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def subscriber_factory() -> Iterator[object]:
    made: list[Subscriber] = []

    def make(url: str, subject: str) -> Subscriber:
        sub = Subscriber(url, subject)
        made.append(sub)
        return sub

    try:
        yield make
    finally:
        for sub in made:
            sub.close()
