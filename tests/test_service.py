"""NATS services (ADR-32) from blocking code: endpoints, groups, discovery and stats,
against real servers, with nats-py (plain requests on the ``$SRV`` subjects, and its
``nats.micro`` services) on the other side."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
import nats.micro
import pytest
from nats.micro.service import ServiceInfo, ServiceStats

from openfactory_nats import (
    ClusterClosedError,
    ClusterTimeoutError,
    InvalidMessageError,
    InvalidTypeError,
    Msg,
    NoRespondersError,
    Service,
    ServiceError,
    ServiceInstance,
    SyncNatsCluster,
)

from .servers import NatsServer
from .test_cli import run

pytestmark = pytest.mark.timeout(60)


def assets_handler(msg: Msg) -> bytes:
    if msg.data == b"missing":
        raise ServiceError(404, "no such asset")
    if msg.data == b"crash":
        raise ValueError("boom")
    return b"state of " + msg.subject.encode()


async def nats_py_gather(url: str, subject: str, wait: float = 0.5) -> list[dict[str, Any]]:
    """A discovery client written with plain nats-py: one request, every reply for *wait* s."""
    nc = await nats.connect(url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(subject, b"", reply=inbox)
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            if not (msg.headers or {}).get("Status"):
                got.append(json.loads(msg.data))
        return got
    finally:
        await nc.close()


async def nats_py_requests(url: str, subjects: list[str]) -> list[dict[str, Any]]:
    nc = await nats.connect(url)
    try:
        return [json.loads((await nc.request(subject, b"", timeout=5)).data) for subject in subjects]
    finally:
        await nc.close()


class LoopThread:
    """An asyncio loop on a thread, for nats-py services that live while a test blocks."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def micro_service(server: NatsServer) -> Iterator[Any]:
    """A service written with nats-py's ``nats.micro`` (async handlers)."""
    side = LoopThread()

    async def start() -> Any:
        nc = await nats.connect(server.url)

        async def echo(request: Any) -> None:
            await request.respond(request.data)

        svc = await nats.micro.add_service(
            nc, name="pymicro", version="2.1.0", description="written with nats.micro", metadata={"lang": "py"}
        )
        await svc.add_endpoint(name="echo", subject="py.echo", handler=echo)
        await svc.add_group(name="grp").add_endpoint(name="ping", handler=echo)
        return nc, svc

    nc, svc = side.run(start())
    try:
        yield svc
    finally:
        side.run(svc.stop())
        side.run(nc.close())
        side.close()


def test_service_discovered_by_nats_py_with_info_and_stats(
    server: NatsServer, service: SyncNatsCluster, client: SyncNatsCluster
) -> None:
    svc = service.service("assets", "1.0.0", description="asset state", metadata={"site": "A"})
    svc.endpoint("state", assets_handler, subject="assets.*.state", workers=4, metadata={"unit": "C"})
    svc.group("cmd").endpoint("restart", lambda msg: b"restarted")
    for i in range(5):
        assert client.request(f"assets.{i}.state").data == f"state of assets.{i}.state".encode()
    for _ in range(2):
        with pytest.raises(ServiceError) as missing:
            client.request("assets.x.state", b"missing")
        assert missing.value.code == 404 and missing.value.description == "no such asset"
    with pytest.raises(ServiceError) as crashed:
        client.request("assets.x.state", b"crash")
    assert crashed.value.code == 500 and "boom" in crashed.value.description
    assert client.request("cmd.restart").data == b"restarted"

    # Every one of the nine ADR-32 subjects, answered to a plain nats-py client.
    subjects = [
        f"$SRV.{verb}{suffix}" for verb in ("PING", "INFO", "STATS") for suffix in ("", ".assets", f".assets.{svc.id}")
    ]
    answers = asyncio.run(nats_py_requests(server.url, subjects))
    for subject, answer in zip(subjects, answers, strict=True):
        verb = subject.split(".")[1].lower()
        assert answer["type"] == f"io.nats.micro.v1.{verb}_response"
        assert (answer["name"], answer["id"], answer["version"]) == ("assets", svc.id, "1.0.0")
        assert answer["metadata"] == {"site": "A"}

    info = ServiceInfo.from_dict(answers[3])  # nats-py's own reading of the responses
    assert info.description == "asset state"
    assert [(e.name, e.subject, e.queue_group, e.metadata) for e in info.endpoints] == [
        ("state", "assets.*.state", "q", {"unit": "C"}),
        ("restart", "cmd.restart", "q", {}),
    ]
    stats = ServiceStats.from_dict(answers[6])
    state, restart = stats.endpoints
    assert (state.num_requests, state.num_errors, state.last_error) == (8, 3, "500:ValueError: boom")
    assert state.processing_time > 0 and state.average_processing_time == state.processing_time // 8
    assert (restart.num_requests, restart.num_errors, restart.last_error) == (1, 0, "")
    started = stats.started if stats.started.tzinfo else stats.started.replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - started).total_seconds()) < 60  # RFC 3339, UTC
    assert answers[6]["started"].endswith("Z")
    assert svc.stats()["endpoints"][0]["num_requests"] == 8  # the same, locally
    assert svc.info() == {**answers[3]}

    # A wildcard discovery gathers every instance's answer.
    pings = asyncio.run(nats_py_gather(server.url, "$SRV.PING"))
    assert [p["id"] for p in pings] == [svc.id]


def test_discover_finds_this_library_s_service(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    svc = service.service("assets", "1.0.0", description="asset state", metadata={"site": "A"})
    svc.endpoint("state", assets_handler, subject="assets.*.state")
    client.request("assets.1.state")
    with pytest.raises(ServiceError):
        client.request("assets.1.state", b"missing")
    (found,) = client.discover("assets", timeout=0.5)
    assert isinstance(found, ServiceInstance) and hash(found) == hash(found)
    assert (found.name, found.id, found.version, found.description) == ("assets", svc.id, "1.0.0", "asset state")
    assert found.metadata == {"site": "A"} and found.ping is not None and found.started is not None
    (endpoint,) = found.endpoints
    assert endpoint["subject"] == "assets.*.state" and endpoint["queue_group"] == "q"
    assert (endpoint["num_requests"], endpoint["num_errors"], endpoint["last_error"]) == (2, 1, "404:no such asset")
    assert client.discover("other", timeout=0.2) == []
    assert [i.id for i in client.discover(timeout=0.5)] == [svc.id]
    svc.reset()
    (after,) = client.discover("assets", timeout=0.5)
    assert after.endpoints[0]["num_requests"] == 0 and after.endpoints[0]["last_error"] == ""


def test_nats_micro_service_is_discovered_and_listed(
    server: NatsServer, client: SyncNatsCluster, micro_service: Any
) -> None:
    (found,) = client.discover("pymicro", timeout=0.5)
    assert (found.id, found.version, found.description) == (micro_service.id, "2.1.0", "written with nats.micro")
    assert found.metadata == {"lang": "py"}
    assert [(e["name"], e["subject"], e["queue_group"]) for e in found.endpoints] == [
        ("echo", "py.echo", "q"),
        ("ping", "grp.ping", "q"),
    ]
    assert client.request("py.echo", b"hi").data == b"hi"
    (after,) = client.discover("pymicro", timeout=0.5)
    assert after.endpoints[0]["num_requests"] == 1

    listed = run(["services", "pymicro", "--servers", server.url, "--json", "--timeout", "0.5"])
    assert listed.returncode == 0, listed.stderr
    (shown,) = json.loads(listed.stdout)
    assert shown["id"] == micro_service.id and shown["endpoints"][0]["num_requests"] == 1
    table = run(["services", "--servers", server.url, "--timeout", "0.5"])
    assert table.returncode == 0, table.stderr
    out = table.stdout.decode()
    assert f"pymicro 2.1.0 id={micro_service.id}" in out and "grp.ping" in out and "REQUESTS" in out


def test_cli_lists_this_library_s_services(server: NatsServer, service: SyncNatsCluster) -> None:
    svc = service.service("assets", "1.0.0")
    svc.endpoint("state", assets_handler)
    result = run(["services", "assets", "--servers", server.url, "--json", "--timeout", "0.5"])
    assert result.returncode == 0, result.stderr
    (shown,) = json.loads(result.stdout)
    assert shown["id"] == svc.id and shown["endpoints"][0]["subject"] == "state"
    none = run(["services", "nothing", "--servers", server.url, "--timeout", "0.2"])
    assert none.returncode == 0 and none.stdout == b"" and b"no instance" in none.stderr


def test_two_instances_in_one_queue_group_share_the_requests(
    server: NatsServer, logger: logging.Logger, client: SyncNatsCluster
) -> None:
    with SyncNatsCluster("one", [server.url], logger) as one, SyncNatsCluster("two", [server.url], logger) as two:
        services = [nats.service("assets", "1.0.0") for nats in (one, two)]
        for svc in services:
            svc.endpoint("state", lambda msg: b"ok")
        for _ in range(200):
            client.request("state")
        counts = [svc.stats()["endpoints"][0]["num_requests"] for svc in services]
        assert sum(counts) == 200 and min(counts) > 0
        assert {i.id for i in client.discover("assets", timeout=0.5)} == {svc.id for svc in services}


def test_groups_prefix_their_endpoints(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    svc = service.service("machines", "0.1.0-rc.1+build.5", queue_group="machines")
    cmd = svc.group("cmd")
    cmd.endpoint("restart", lambda msg: b"restart " + msg.data)
    cmd.group("admin", queue_group="admins").endpoint("halt", lambda msg: b"halted", subject="now")
    svc.group("site.*").endpoint("state", lambda msg: msg.subject.encode())
    assert client.request("cmd.restart", b"m1").data == b"restart m1"
    assert client.request("cmd.admin.now").data == b"halted"
    assert client.request("site.A.state").data == b"site.A.state"
    assert [(e["subject"], e["queue_group"]) for e in svc.info()["endpoints"]] == [
        ("cmd.restart", "machines"),
        ("cmd.admin.now", "admins"),
        ("site.*.state", "machines"),
    ]
    with pytest.raises(InvalidMessageError):
        svc.group("all.>")


@pytest.mark.timeout(30)
def test_stop_drains_the_requests_received(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    svc = service.service("slow", "1.0.0")
    entered = threading.Semaphore(0)
    release = threading.Event()

    def slow(msg: Msg) -> bytes:
        entered.release()
        release.wait(10)
        return b"done " + msg.data

    endpoint = svc.endpoint("work", slow, workers=2)
    replies: list[bytes] = []
    requesters = [
        threading.Thread(target=lambda i=i: replies.append(client.request("work", b"%d" % i, timeout=10).data))
        for i in range(4)
    ]
    for thread in requesters:
        thread.start()
    assert entered.acquire(timeout=5) and entered.acquire(timeout=5)  # both workers busy
    assert endpoint.subscription is not None
    deadline = time.monotonic() + 5
    while endpoint.subscription.pending < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # the other two requests wait in the endpoint
    assert endpoint.subscription.pending == 2
    threading.Timer(0.2, release.set).start()
    svc.stop(timeout=10)
    for thread in requesters:
        thread.join(10)
    assert sorted(replies) == [b"done %d" % i for i in range(4)]
    assert not svc.running and not endpoint.subscription.is_open
    with pytest.raises(NoRespondersError):
        client.request("work")
    assert client.discover("slow", timeout=0.3) == []
    svc.stop()  # idempotent
    with pytest.raises(ClusterClosedError):
        svc.endpoint("more", slow)


@pytest.mark.timeout(30)
def test_stop_that_runs_out_of_time_raises_and_the_reply_still_goes(
    service: SyncNatsCluster, client: SyncNatsCluster
) -> None:
    svc = service.service("slow", "1.0.0")
    entered = threading.Event()
    release = threading.Event()

    def stuck(msg: Msg) -> bytes:
        entered.set()
        release.wait(10)
        return b"late"

    svc.endpoint("work", stuck)
    got: list[bytes] = []
    requester = threading.Thread(target=lambda: got.append(client.request("work", timeout=10).data))
    requester.start()
    assert entered.wait(5)
    with pytest.raises(ClusterTimeoutError):
        svc.stop(timeout=0.2)
    release.set()
    requester.join(10)
    assert got == [b"late"]


def test_closing_the_cluster_stops_its_service(
    server: NatsServer, logger: logging.Logger, client: SyncNatsCluster
) -> None:
    nats_ = SyncNatsCluster("owner", [server.url], logger)
    svc = nats_.service("assets", "1.0.0")
    svc.endpoint("state", lambda msg: b"ok")
    assert client.request("state").data == b"ok" and svc.running
    nats_.close()
    assert not svc.running
    assert client.discover("assets", timeout=0.3) == []
    with pytest.raises(NoRespondersError):
        client.request("state")
    svc.stop()  # nothing left to do, no error
    with pytest.raises(ClusterClosedError):
        nats_.service("assets", "1.0.0")
    assert not [t for t in threading.enumerate() if t.name.startswith("openfactory-nats-owner")]


def test_a_bad_reply_answers_500_and_counts(
    service: SyncNatsCluster, client: SyncNatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    svc = service.service("odd", "1.0.0")
    svc.endpoint("text", lambda msg: "not bytes")
    svc.endpoint("headers", lambda msg: (b"x", {"bad header": "v"}))
    svc.endpoint("nothing", lambda msg: None)
    for subject in ("text", "headers"):
        with caplog.at_level(logging.ERROR), pytest.raises(ServiceError) as failed:
            client.request(subject)
        assert failed.value.code == 500
    assert client.request("nothing").data == b""
    assert "the handler raised on a request to 'text'" in caplog.text
    text, headers, nothing = svc.stats()["endpoints"]
    assert (text["num_errors"], headers["num_errors"], nothing["num_errors"]) == (1, 1, 0)
    assert text["last_error"].startswith("500:InvalidTypeError")


def test_names_versions_and_endpoints_are_validated(service: SyncNatsCluster) -> None:
    for name in ("a.b", "", "a b", "a*", "é"):
        with pytest.raises(InvalidMessageError):
            service.service(name, "1.0.0")
    with pytest.raises(InvalidTypeError):
        service.service(1, "1.0.0")  # type: ignore[arg-type]
    for version in ("1.0", "v1.0.0", "1.0.0-", "01.0.0", ""):
        with pytest.raises(InvalidMessageError):
            service.service("assets", version)
    with pytest.raises(InvalidTypeError):
        service.service("assets", "1.0.0", metadata={"a": 1})  # type: ignore[dict-item]
    before = service.stats()["subscriptions"]
    svc = service.service("assets", "1.0.0")
    assert service.stats()["subscriptions"] == before + 9
    svc.endpoint("state", lambda msg: b"")
    with pytest.raises(InvalidMessageError, match="already"):
        svc.endpoint("state", lambda msg: b"", subject="other")
    for bad in ("a.b", "", "x y"):
        with pytest.raises(InvalidMessageError):
            svc.endpoint(bad, lambda msg: b"")
    with pytest.raises(InvalidMessageError):
        svc.endpoint("sub", lambda msg: b"", subject="a..b")
    with pytest.raises(InvalidTypeError):
        svc.endpoint("call", b"not callable")  # type: ignore[arg-type]
    with pytest.raises(InvalidMessageError):
        svc.endpoint("workers", lambda msg: b"", workers=0)
    assert [e.name for e in svc.endpoints] == ["state"]
    assert service.stats()["subscriptions"] == before + 10
    svc.stop()
    assert service.stats()["subscriptions"] == before


def test_service_error_from_serve_keeps_its_code(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    def refuse(msg: Msg) -> bytes:
        raise ServiceError(409, "conflict")

    service.serve("refuse", refuse)
    with pytest.raises(ServiceError) as refused:
        client.request("refuse")
    assert (refused.value.code, refused.value.description) == (409, "conflict")
    made = ServiceError(404, "gone")
    assert (made.code, made.description, made.cluster) == (404, "gone", None) and "404" in str(made)


def test_service_as_context_manager(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    with service.service("ctx", "1.0.0") as svc:
        assert isinstance(svc, Service) and "ctx" in repr(svc)
        svc.endpoint("echo", lambda msg: msg.data)
        assert client.request("echo", b"x").data == b"x"
    assert not svc.running
    with pytest.raises(NoRespondersError):
        client.request("echo")


def test_stop_from_a_handler_answers_and_returns(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    svc = service.service("self", "1.0.0")

    def quit_(msg: Msg) -> bytes:
        svc.stop(timeout=5)  # waits for the other workers, not for itself
        return b"bye"

    svc.endpoint("quit", quit_, workers=2)
    assert client.request("quit", timeout=10).data == b"bye"
    assert not svc.running
    assert svc.stats()["endpoints"][0]["num_requests"] == 1
    with pytest.raises(InvalidMessageError):
        client.discover("bad.name")
    with pytest.raises(InvalidMessageError):
        client.discover(timeout=-1)
