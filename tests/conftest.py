from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from openfactory_nats import SyncNatsCluster

from .jspeer import Peer
from .servers import NatsServer, SilentServer, Subscriber, TcpProxy, wait_for_mesh


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
def peer(jetstream_server: NatsServer) -> Iterator[Peer]:
    """nats-py's own async JetStream API on the JetStream server: the other side of the tests."""
    made = Peer(jetstream_server.url)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Exceptions that escaped a thread (the test asserts there are none)."""
    caught: list[BaseException] = []

    def hook(args: threading.ExceptHookArgs) -> None:
        caught.append(args.exc_value if args.exc_value is not None else RuntimeError(str(args.exc_type)))

    monkeypatch.setattr(threading, "excepthook", hook)
    return caught


@pytest.fixture
def cluster3() -> Iterator[list[NatsServer]]:
    """Three nats-server processes forming one cluster through routes.

    Each node gets its cluster port from nats-server and routes to the nodes started before
    it; gossip completes the mesh. A restarted node keeps its ports, so routes find it again.
    """
    nodes: list[NatsServer] = []
    try:
        for i in range(3):
            routes = [n.cluster_port for n in nodes if n.cluster_port]
            node = NatsServer(name=f"node{i}", cluster_port=0, routes=routes)
            nodes.append(node)  # before start(), so a failed start is cleaned up too
            node.start()
        wait_for_mesh(nodes)
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


@pytest.fixture
def service(server: NatsServer, logger: logging.Logger) -> Iterator[SyncNatsCluster]:
    """The responding side of request tests: its own instance, as another process would have."""
    with SyncNatsCluster("service", [server.url], logger) as nats:
        yield nats


@pytest.fixture
def client(server: NatsServer, logger: logging.Logger) -> Iterator[SyncNatsCluster]:
    """The requesting side of request tests."""
    with SyncNatsCluster("client", [server.url], logger) as nats:
        yield nats
