"""Edge cases of NATS services (ADR-32): replies that cannot be sent, validation, hostile
discovery replies, stop racing close."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import nats
import pytest

from openfactory_nats import InvalidMessageError, InvalidTypeError, ServiceError, SyncNatsCluster

from .servers import NatsServer

pytestmark = pytest.mark.timeout(60)


def test_a_version_with_non_ascii_digits_is_refused(service: SyncNatsCluster) -> None:
    for version in ("1\u0663.0.0", "1.0.0-\u0663a", "1.0.0+\u0663"):
        with pytest.raises(InvalidMessageError):
            service.service("v", version)


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
