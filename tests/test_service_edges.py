"""Edge cases of NATS services (ADR-32): replies that cannot be sent, validation, hostile
discovery replies, stop racing close."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import nats
import pytest

from openfactory_nats import (
    ClusterState,
    ClusterUnavailableError,
    InvalidMessageError,
    InvalidTypeError,
    Service,
    ServiceError,
    SyncNatsCluster,
)

from .servers import NatsServer, TcpProxy

pytestmark = pytest.mark.timeout(60)


def test_a_reply_too_large_to_send_counts_as_an_error(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    svc = service.service("big", "1.0.0")
    svc.endpoint("big", lambda msg: b"x" * (2 * 1024 * 1024))
    with pytest.raises(ServiceError) as failed:
        client.request("big", timeout=5)
    assert failed.value.code == 500
    (stats,) = svc.stats()["endpoints"]
    assert (stats["num_requests"], stats["num_errors"]) == (1, 1)
    assert stats["last_error"].startswith("500:")


def test_a_version_with_non_ascii_digits_is_refused(service: SyncNatsCluster) -> None:
    for version in ("1\u0663.0.0", "1.0.0-\u0663a", "1.0.0+\u0663"):
        with pytest.raises(InvalidMessageError):
            service.service("v", version)


def test_a_nested_group_s_name_is_checked_for_its_type(service: SyncNatsCluster) -> None:
    group = service.service("g", "1.0.0").group("cmd")
    for name in (5, None, b"x"):
        with pytest.raises(InvalidTypeError):
            group.group(name)  # type: ignore[arg-type]


def test_a_service_error_without_a_code_keeps_its_text(service: SyncNatsCluster, client: SyncNatsCluster) -> None:
    def handler(msg: object) -> bytes:
        raise ServiceError("no such asset")

    svc = service.service("txt", "1.0.0")
    svc.endpoint("txt", handler)
    with pytest.raises(ServiceError) as failed:
        client.request("txt", timeout=5)
    assert failed.value.code == 500 and failed.value.description == "no such asset"
    assert svc.stats()["endpoints"][0]["last_error"] == "500:no such asset"


def test_discovery_ignores_a_deeply_nested_reply(server: NatsServer, client: SyncNatsCluster) -> None:
    ready = threading.Event()
    done = threading.Event()

    async def hostile() -> None:
        nc = await nats.connect(server.url)

        async def answer(msg: Any) -> None:
            await msg.respond(b"[" * 200_000)

        await nc.subscribe("$SRV.PING.evil", cb=answer)
        await nc.flush()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, done.wait)
        await nc.close()

    side = threading.Thread(target=asyncio.run, args=(hostile(),), daemon=True)
    side.start()
    try:
        assert ready.wait(10)
        assert client.discover("evil", timeout=0.5) == []
    finally:
        done.set()
        side.join(10)


def _stop(svc: Service, errors: list[BaseException]) -> None:
    try:
        svc.stop(2.0)
    except BaseException as exc:  # noqa: BLE001 - the test looks at whatever escaped
        errors.append(exc)


def test_stop_racing_close_from_another_thread(server: NatsServer, logger: logging.Logger) -> None:
    for _ in range(10):
        nats_ = SyncNatsCluster("race", [server.url], logger)
        svc = nats_.service("race", "1.0.0")
        svc.endpoint("a", lambda msg: b"a", workers=2)
        svc.endpoint("b", lambda msg: b"b")
        errors: list[BaseException] = []
        stopper = threading.Thread(target=_stop, args=(svc, errors))
        stopper.start()
        nats_.close()
        stopper.join(10)
        assert not stopper.is_alive() and errors == []
        assert not svc.running


def test_stop_during_a_disconnection_raises_unavailable_and_ends_the_service(
    server: NatsServer, proxy: TcpProxy, logger: logging.Logger
) -> None:
    with SyncNatsCluster("cut", [proxy.url], logger) as nats_, SyncNatsCluster("seer", [server.url], logger) as seer:
        svc = nats_.service("cut", "1.0.0")
        svc.endpoint("a", lambda msg: b"a", workers=2)
        assert [i.id for i in seer.discover("cut", timeout=0.5)] == [svc.id]
        proxy.cut()
        deadline = time.monotonic() + 10
        while nats_.state is not ClusterState.RECONNECTING and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(ClusterUnavailableError):
            svc.stop(0.5)
        assert not svc.running
        proxy.restore()
        deadline = time.monotonic() + 10
        while not nats_.is_connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seer.discover("cut", timeout=0.5) == []
