"""Embedded servers pick their own ports, keep them across restarts, and cope with a port
taken while they were down."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from openfactory_nats._tools.embedded import EmbeddedServer

from .servers import NatsServer, wait_for_mesh


@pytest.fixture
def pair() -> Iterator[list[NatsServer]]:
    servers = [NatsServer(name="a", cluster_port=0), NatsServer(name="b", ready_timeout=2)]
    try:
        for srv in servers:
            srv.start()
        yield servers
    finally:
        for srv in servers:
            srv.close()


def ports(srv: NatsServer) -> list[int]:
    return [p for p in (srv.port, srv.monitor_port, srv.cluster_port) if p is not None]


def occupy(port: int) -> socket.socket:
    """Listen on *port*, as another process grabbing it in between would."""
    return socket.create_server(("127.0.0.1", port))


def test_url_before_start_is_refused() -> None:
    srv = EmbeddedServer("early")
    try:
        with pytest.raises(RuntimeError, match="before start"):
            _ = srv.url
    finally:
        srv.close()


@pytest.mark.timeout(30)
def test_servers_get_distinct_ports_and_restart_keeps_them(pair: list[NatsServer]) -> None:
    a, b = pair
    before = ports(a) + ports(b)
    assert len(before) == 5 and len(set(before)) == 5 and all(before), before
    assert a.monitor("varz")["cluster"]["cluster_port"] == a.cluster_port
    for srv in pair:
        srv.restart()
    assert ports(a) + ports(b) == before
    varz = a.monitor("varz")
    assert [varz["port"], varz["http_port"], varz["cluster"]["cluster_port"]] == ports(a)
    with socket.create_connection(("127.0.0.1", b.port), timeout=2) as conn:
        assert conn.recv(5) == b"INFO "


@pytest.mark.timeout(30)
@pytest.mark.parametrize("which", ["port", "monitor_port", "cluster_port"])
def test_restart_waits_for_a_port_taken_meanwhile(pair: list[NatsServer], which: str) -> None:
    a = pair[0]
    before = ports(a)
    a.stop()
    thief = occupy(getattr(a, which))
    release = threading.Timer(1.0, thief.close)  # the other process lets go after a while
    release.start()
    try:
        a.restart()
    finally:
        release.cancel()
        thief.close()
    assert ports(a) == before
    assert "address already in use" in a.log_text(), "the port was never actually contended"
    assert a.monitor("varz")["port"] == a.port


@pytest.mark.timeout(30)
def test_restart_on_a_port_that_stays_taken_fails_clearly(pair: list[NatsServer]) -> None:
    b = pair[1]  # ready_timeout=2
    b.stop()
    with occupy(b.port):
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"port still in use after \d+ attempts.*{b.port}"):
            b.restart()
        assert time.monotonic() - started < b.ready_timeout + 1


@pytest.mark.timeout(45)
def test_cluster3_forms_a_mesh_and_a_restarted_node_rejoins(cluster3: list[NatsServer]) -> None:
    assert len({p for node in cluster3 for p in ports(node)}) == 9
    assert [node.peers() for node in cluster3] == [{"node1", "node2"}, {"node0", "node2"}, {"node0", "node1"}]
    first = cluster3[0]  # the node that has no routes of its own: the others must find it again
    before = ports(first)
    first.restart()
    assert ports(first) == before
    wait_for_mesh(cluster3)
