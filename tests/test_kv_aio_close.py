"""The asyncio watch (``AsyncWatch``) when its cluster closes under a reader."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from openfactory_nats import NatsCluster, SubscriptionClosedError

from .servers import NatsServer


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reader", ["next", "async-for"])
def test_close_ends_a_task_reading_an_asyncio_watch(
    jetstream_server: NatsServer, logger: logging.Logger, reader: str
) -> None:
    """A task awaiting the next entry learns that the cluster closed: ``next`` raises
    SubscriptionClosedError (``async for`` ends), within seconds, not after its timeout."""

    async def main() -> tuple[str, float, list[int]]:
        core = NatsCluster("aw", [jetstream_server.url], logger)
        await core.connect()
        kv = await core.jetstream().create_key_value("acl", storage="memory")
        await kv.put("a", b"1")
        watch = await kv.watch(">")
        first = await watch.next(10)
        got = [first.revision]

        async def read() -> str:
            if reader == "next":
                try:
                    await watch.next(30)
                except SubscriptionClosedError:
                    return "closed"
                return "entry"
            async for entry in watch:
                got.append(entry.revision)
            return "ended"

        task = asyncio.create_task(read())
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await core.close()
        outcome = await asyncio.wait_for(task, 20)
        return outcome, time.monotonic() - started, got

    outcome, took, got = asyncio.run(main())
    assert outcome == ("closed" if reader == "next" else "ended")
    assert took < 10, took
    assert got == [1]
