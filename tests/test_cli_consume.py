"""The ``consume`` command, run as a subprocess against a real JetStream server; what it
acknowledged is checked with nats-py's own JetStream API."""

from __future__ import annotations

import asyncio

import nats
import pytest

from .servers import NatsServer
from .test_cli import run


async def _setup(url: str, count: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="CMDS", subjects=["cmds.>"])
        for i in range(count):
            await js.publish(f"cmds.{i % 3}", b"job %d" % i)
    finally:
        await nc.close()


async def _ack_floor(url: str) -> tuple[int, int]:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info("CMDS", "w")
        return info.ack_floor.stream_seq, info.num_ack_pending
    finally:
        await nc.close()


@pytest.mark.timeout(60)
def test_consume_prints_and_acks(jetstream_server: NatsServer) -> None:
    url = jetstream_server.url
    asyncio.run(_setup(url, 5))
    result = run(["consume", "--servers", url, "--stream", "CMDS", "--durable", "w", "--count", "3", "--ack"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines == [f"[cmds.{i}] #{i + 1} delivered=1 job {i}" for i in range(3)]
    assert asyncio.run(_ack_floor(url)) == (3, 0)
    # without --ack the messages stay pending: printed, not acknowledged
    result = run(["consume", "--servers", url, "--stream", "CMDS", "--durable", "w", "--count", "2"])
    assert result.returncode == 0, result.stderr
    assert [ln.split()[-1] for ln in result.stdout.decode().splitlines()] == ["3", "4"]
    assert asyncio.run(_ack_floor(url)) == (3, 2)


@pytest.mark.timeout(60)
def test_consume_exits_1_when_too_few_came(jetstream_server: NatsServer) -> None:
    url = jetstream_server.url
    asyncio.run(_setup(url, 2))
    result = run(
        ["consume", "--servers", url, "--stream", "CMDS", "--durable", "w", "--count", "5", "--timeout", "1", "--ack"]
    )
    assert result.returncode == 1
    assert len(result.stdout.decode().splitlines()) == 2
    assert "2 message(s)" in result.stderr.decode()


@pytest.mark.timeout(60)
def test_consume_missing_stream_is_a_clean_error(jetstream_server: NatsServer) -> None:
    result = run(["consume", "--servers", jetstream_server.url, "--stream", "NOPE", "--durable", "w", "--count", "1"])
    assert result.returncode == 1
    assert "stream not found" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()
