"""The one close path of the blocking layer (_blocking/closing.shut_down), against real servers."""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from openfactory_nats import ClusterState, ClusterTimeoutError, SyncClusterRouter, SyncNatsCluster

from .servers import NatsServer


@pytest.fixture
def two() -> Iterator[dict[str, NatsServer]]:
    servers = {name: NatsServer(name=name) for name in ("A", "B")}
    try:
        for srv in servers.values():
            srv.start()
        yield servers
    finally:
        for srv in servers.values():
            srv.close()


def in_child(body: Callable[[], str], deadline: float = 20.0) -> str:
    """Fork; the child runs *body* and sends back what it returns (or the exception it
    raised, or "hung" when killed after *deadline* s)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            try:
                outcome = body()
            except BaseException as exc:  # reported to the parent, which asserts
                outcome = f"raised {type(exc).__name__}: {exc}"
            os.write(write, outcome.encode())
        finally:
            os._exit(0)
    os.close(write)
    ends = time.monotonic() + deadline
    try:
        while time.monotonic() < ends:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hung"
        chunks = []
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(read)


def key_of(router: SyncClusterRouter, cluster: str) -> str:
    return next(k for k in (str(uuid.UUID(int=i)) for i in range(1000)) if router.cluster_for(k) == cluster)


@pytest.mark.timeout(60)
def test_router_closed_in_a_forked_child_closes_every_cluster(
    two: dict[str, NatsServer], logger: logging.Logger
) -> None:
    """A router closed in a forked child closes all its clusters there, those the child
    used and those it did not: every call afterwards raises ClusterClosedError (the
    close before the one close path renewed each cluster, then closed it)."""
    with SyncClusterRouter({n: s.url for n, s in two.items()}, logger, timeout=3) as router:
        router.connect()
        key_a, key_b = key_of(router, "A"), key_of(router, "B")

        def body() -> str:
            router.publish(key_a, "child.a", b"1")  # A is used in the child, B is not
            router.close(2)
            outcomes = []
            for key in (key_a, key_b):
                try:
                    router.publish(key, "child.after", b"x")
                    outcomes.append(f"{router.cluster_for(key)}: published")
                except Exception as exc:
                    outcomes.append(f"{router.cluster_for(key)}: {type(exc).__name__}")
            states = ",".join(f"{n}={c.state.value}" for n, c in router.clusters.items())
            return " ".join(outcomes) + " " + states

        assert in_child(body) == "A: ClusterClosedError B: ClusterClosedError A=closed,B=closed"


@pytest.mark.timeout(30)
def test_a_close_that_cannot_wait_for_another_one_says_so(server: NatsServer, logger: logging.Logger) -> None:
    """A close() that waited its timeout plus the margin for another close() still
    running raises ClusterTimeoutError (it returned as if closed, the instance still
    open); once the other one is done, close() returns and the instance is closed."""
    cluster = SyncNatsCluster("CL", [server.url], logger)
    cluster.connect()
    held = cluster._holdings.lock
    held.acquire()  # as a close() that is still draining a stalled server would
    try:
        started = time.monotonic()
        with pytest.raises(ClusterTimeoutError, match="another close"):
            cluster.close(0.1)
        assert time.monotonic() - started < 10
    finally:
        held.release()
    cluster.close(5)
    assert cluster.state is ClusterState.CLOSED
