"""A worker pool whose consumer (or stream) is deleted on the server stops, says so once,
and does not retry for ever; the asyncio pool's stop() leaves nothing fetched behind."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest

from openfactory_nats import JsMsg, NatsCluster, SyncNatsCluster

from .jspeer import Peer, wait_until
from .servers import NatsServer


def _errors_about(caplog: pytest.LogCaptureFixture, consumer: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and "the pool stops" in r.getMessage()]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("prefetch", [0, 20], ids=["own-fetch", "prefetch"])
@pytest.mark.parametrize("deleted", ["consumer", "stream"])
def test_a_pool_stops_when_its_consumer_or_stream_is_deleted(
    jetstream_server: NatsServer,
    peer: Peer,
    logger: logging.Logger,
    caplog: pytest.LogCaptureFixture,
    prefetch: int,
    deleted: str,
) -> None:
    caplog.set_level(logging.WARNING)
    peer.run(peer.js.add_stream(name="GONE", subjects=["gone.>"]))
    peer.publish_many([("gone.a", b"%d" % i) for i in range(20)])
    handled: list[bytes] = []
    lock = threading.Lock()

    def handler(msg: JsMsg) -> None:
        with lock:
            handled.append(msg.data)

    with SyncNatsCluster("gone", [jetstream_server.url], logger) as nats_:
        pool = nats_.jetstream().consume("gone.>", handler, durable="gone", workers=3, prefetch=prefetch)
        assert wait_until(lambda: len(handled) == 20)
        assert pool.running
        if deleted == "consumer":
            peer.run(peer.js.delete_consumer("GONE", "gone"))
        else:
            peer.run(peer.js.delete_stream("GONE"))
        assert wait_until(lambda: not pool.running, 15), "the pool kept running"
        assert all(not t.is_alive() for t in pool.workers) or wait_until(
            lambda: all(not t.is_alive() for t in pool.workers), 5
        )
        errors = _errors_about(caplog, "gone")
        assert len(errors) == 1, [r.getMessage() for r in errors]  # said once, not once per worker
        retries = [r for r in caplog.records if "retrying" in r.getMessage()]
        caplog.clear()
        threading.Event().wait(1.5)  # what a retrying pool would log meanwhile
        assert not [r for r in caplog.records if "retrying" in r.getMessage()], retries
        pool.stop(5)  # still fine to call
        assert nats_.stats()["js_processed"] == 20
        nats_.publish("after.gone", b"x")  # the cluster is unharmed


@pytest.mark.timeout(60)
def test_the_asyncio_pool_stops_when_its_consumer_is_deleted(
    jetstream_server: NatsServer, peer: Peer, logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    peer.run(peer.js.add_stream(name="AGONE", subjects=["agone.>"]))
    peer.publish_many([("agone.a", b"%d" % i) for i in range(10)])

    async def main() -> None:
        core = NatsCluster("agone", [jetstream_server.url], logger)
        try:
            handled: list[bytes] = []

            async def handler(msg: Any) -> None:
                handled.append(msg.data)

            pool = await core.jetstream().consume("agone.>", handler, durable="agone", workers=2)
            for _ in range(500):
                if len(handled) == 10:
                    break
                await asyncio.sleep(0.02)
            assert len(handled) == 10 and pool.running
            await asyncio.to_thread(peer.run, peer.js.delete_consumer("AGONE", "agone"))
            for _ in range(750):
                if not pool.running:
                    break
                await asyncio.sleep(0.02)
            assert not pool.running
            await pool.stop(5)
        finally:
            await core.close()

    asyncio.run(main())
    assert len(_errors_about(caplog, "agone")) == 1


@pytest.mark.timeout(60)
def test_the_asyncio_pools_stop_leaves_no_fetched_message_waiting_for_its_ack_wait(
    jetstream_server: NatsServer, peer: Peer, logger: logging.Logger
) -> None:
    """Stopped while its workers wait in fetches, then with messages coming in: every
    message is handled and acked, or still pending on the server; none is held, delivered
    to a subscription that was already gone (it would wait out its 30 s ack wait)."""
    peer.run(peer.js.add_stream(name="ASTOP", subjects=["astop.>"]))

    async def main() -> int:
        core = NatsCluster("astop", [jetstream_server.url], logger)
        handled = 0
        try:

            async def handler(msg: Any) -> None:
                nonlocal handled
                handled += 1

            for round_ in range(5):
                pool = await core.jetstream().consume("astop.>", handler, durable="astop", workers=4)
                await asyncio.sleep(0.2)  # the workers wait in their fetches
                publishing = asyncio.create_task(
                    asyncio.to_thread(peer.publish_many, [("astop.a", b"%d" % i) for i in range(20)])
                )
                await asyncio.sleep(0.01 * round_)
                await pool.stop(5)
                await publishing
        finally:
            await core.close()
        return handled

    handled = asyncio.run(main())
    info = peer.run(peer.js.consumer_info("ASTOP", "astop"))
    assert info.num_ack_pending == 0, (info.num_ack_pending, handled)
    assert handled + info.num_pending == 100


@pytest.mark.timeout(60)
def test_the_asyncio_pool_stopped_from_its_own_handler_does_not_wait_for_that_handler(
    jetstream_server: NatsServer, peer: Peer, logger: logging.Logger
) -> None:
    """As the blocking pool: a handler may stop its own pool; stop() waits for the other
    workers, not for the handler calling it (which would only time out), and the message
    is acked."""
    peer.run(peer.js.add_stream(name="ASELF", subjects=["aself.>"]))
    peer.publish_many([("aself.a", b"x")])

    async def main() -> list[object]:
        core = NatsCluster("aself", [jetstream_server.url], logger)
        outcome: list[object] = []
        try:

            async def handler(msg: Any) -> None:
                try:
                    await pool.stop(2)
                    outcome.append(None)
                except BaseException as exc:
                    outcome.append(exc)
                    raise

            pool = await core.jetstream().consume("aself.>", handler, durable="aself", workers=2)
            for _ in range(100):
                if outcome:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            assert not pool.running
            assert (pool.processed, pool.failed) == (1, 0)
        finally:
            await core.close()
        return outcome

    assert asyncio.run(main()) == [None]
    assert peer.run(peer.js.consumer_info("ASELF", "aself")).num_ack_pending == 0
