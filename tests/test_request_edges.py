"""Request/reply edges: the public-API path, replies a handler cannot send, handlers raising
BaseException, a short timeout beside a first request, close with a blocked handler."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from openfactory_nats import (
    ClusterTimeoutError,
    InvalidTypeError,
    Msg,
    NatsCluster,
    NatsClusterError,
    SyncNatsCluster,
)

from .servers import NatsServer


@pytest.mark.timeout(30)
def test_requests_work_on_the_public_api_path(
    server: NatsServer, logger: logging.Logger, service: SyncNatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With OPENFACTORY_NATS_PUBLIC_API=1 (or a nats-py without the fast path's
    internals) the outbox holds (subject, payload, headers, size) tuples, but
    offer_request queues a raw frame: the public pump cannot unpack it."""
    service.serve("svc.pub", lambda msg: b"re:" + msg.data)
    monkeypatch.setenv("OPENFACTORY_NATS_PUBLIC_API", "1")
    with SyncNatsCluster("client", [server.url], logger) as client:
        assert client.cluster._fast is False
        started = time.monotonic()
        reply = client.request("svc.pub", b"x", timeout=3)
        assert reply.data == b"re:x"
        assert time.monotonic() - started < 2


@pytest.mark.timeout(30)
def test_a_handler_reply_with_bad_headers_is_answered_with_an_error(
    service: SyncNatsCluster, client: SyncNatsCluster
) -> None:
    """The handler's reply cannot be sent (invalid header name): the requester should get
    a ServiceError at once, not wait for its whole timeout."""
    service.serve("svc.badhdr", lambda msg: (b"ok", {"Bad Name": "v"}))
    started = time.monotonic()
    with pytest.raises(NatsClusterError) as info:
        client.request("svc.badhdr", b"x", timeout=5)
    assert not isinstance(info.value, ClusterTimeoutError), info.value
    assert time.monotonic() - started < 2


@pytest.mark.timeout(30)
def test_a_handler_reply_over_max_payload_is_answered_with_an_error(
    service: SyncNatsCluster, client: SyncNatsCluster
) -> None:
    """A reply larger than the server's max_payload cannot be sent: the requester should
    get a ServiceError at once, not wait for its whole timeout."""
    big = b"x" * (service.cluster.max_payload + 1)
    service.serve("svc.big", lambda msg: big)
    started = time.monotonic()
    with pytest.raises(NatsClusterError) as info:
        client.request("svc.big", b"x", timeout=5)
    assert not isinstance(info.value, ClusterTimeoutError), info.value
    assert time.monotonic() - started < 2


@pytest.mark.timeout(30)
def test_a_handler_raising_a_base_exception_does_not_kill_the_service(
    service: SyncNatsCluster, client: SyncNatsCluster
) -> None:
    """``except Exception`` in the worker lets SystemExit (or any BaseException that is
    not an Exception) end the only worker thread silently: the subscription stays
    registered on the server, so every later request is routed to a service that no
    longer answers and times out."""

    def handler(msg: Msg) -> bytes:
        if msg.data == b"exit":
            raise SystemExit(3)
        return b"re:" + msg.data

    service.serve("svc.exit", handler)
    with pytest.raises(NatsClusterError):
        client.request("svc.exit", b"exit", timeout=2)
    assert client.request("svc.exit", b"after", timeout=3).data == b"re:after"


@pytest.mark.timeout(30)
def test_a_short_timeout_does_not_fail_a_concurrent_first_request(
    server: NatsServer, logger: logging.Logger, service: SyncNatsCluster
) -> None:
    """The first requests share one task subscribing the reply inbox, created with the
    timeout of whichever came first: a caller giving up at once makes that shared task
    fail, and a concurrent caller with 5 s left gets ClusterTimeoutError at once."""
    service.serve("svc.first", lambda msg: b"re:" + msg.data)

    async def main() -> tuple[BaseException | Msg, float]:
        cluster = NatsCluster("aio", [server.url], logger)
        await cluster.connect()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            impatient, patient = await asyncio.gather(
                cluster.request("svc.first", b"a", timeout=0),
                cluster.request("svc.first", b"b", timeout=5),
                return_exceptions=True,
            )
            assert isinstance(impatient, ClusterTimeoutError), impatient
            return patient, loop.time() - started
        finally:
            await cluster.close()

    patient, took = asyncio.run(main())
    assert isinstance(patient, Msg), f"{patient!r} after {took:.3f} s"
    assert patient.data == b"re:b"


@pytest.mark.timeout(30)
def test_close_with_a_blocked_handler_returns_within_its_timeout(server: NatsServer, logger: logging.Logger) -> None:
    """A handler that never returns: close(timeout=0.5) drains at once (the server is
    fine) but then joins the worker until wait + _CLOSE_MARGIN (2 s), a margin meant for
    aborting a late drain, not for waiting on user code."""
    release = threading.Event()
    entered = threading.Event()

    def handler(msg: Msg) -> bytes:
        entered.set()
        release.wait(20)
        return b"late"

    service = SyncNatsCluster("service", [server.url], logger)
    requester = threading.Thread()
    try:
        with SyncNatsCluster("client", [server.url], logger) as client:
            service.serve("svc.block", handler)
            requester = threading.Thread(
                target=lambda: pytest.raises(NatsClusterError, client.request, "svc.block", b"x", timeout=10)
            )
            requester.start()
            assert entered.wait(5)
            started = time.monotonic()
            service.close(timeout=0.5)
            took = time.monotonic() - started
            assert took < 1.5, f"close(timeout=0.5) took {took:.2f} s"
    finally:
        release.set()
        service.close()
        if requester.is_alive():
            requester.join(5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("public_api", [False, True])
def test_a_request_to_the_longest_subject_fits_the_control_line(
    server: NatsServer, logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, public_api: bool
) -> None:
    """A request's PUB/HPUB line carries the caller's subject and the library's reply
    subject: with the longest subject accepted (4000 bytes) and headers, it stays within
    the server's 4 KiB control line (over it, the server would close the connection)."""
    if public_api:
        monkeypatch.setenv("OPENFACTORY_NATS_PUBLIC_API", "1")
    subject = "long." + "s" * 3995
    with (
        SyncNatsCluster("service", [server.url], logger) as service,
        SyncNatsCluster("client", [server.url], logger) as client,
    ):
        service.serve(subject, lambda msg: (b"re:" + msg.data, {"H": "v" * 200}))
        for headers in (None, {"K": "v" * 200}):
            assert client.request(subject, b"x" * 1000, timeout=5, headers=headers).data == b"re:" + b"x" * 1000
        for nats in (service, client):
            stats = nats.stats()
            assert (stats["disconnects"], stats["reconnects"], stats["errors"]) == (0, 0, 0)


@pytest.mark.timeout(30)
def test_a_request_given_up_by_either_api_leaves_no_waiter_behind(server: NatsServer, logger: logging.Logger) -> None:
    """Both APIs drive one request life (Incoming.request_life): a blocking request
    that times out and an async one that is cancelled both forget their waiter, and the
    reply inbox then serves the next request."""
    with SyncNatsCluster("RL", [server.url], logger) as cluster:
        cluster.subscribe("rl.silent")  # a listener that never answers: no 503
        with pytest.raises(ClusterTimeoutError):
            cluster.request("rl.silent", b"x", timeout=0.2)
        replies = cluster.cluster.incoming.replies()
        assert replies is not None and not replies._waiting

        async def cancelled() -> None:
            task = asyncio.ensure_future(cluster.cluster.request("rl.silent", b"y", timeout=10))
            await asyncio.sleep(0.2)
            assert len(replies._waiting) == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run_coroutine_threadsafe(cancelled(), cluster.loop).result(10)
        assert not replies._waiting
        cluster.serve("rl.echo", lambda msg: msg.data)
        assert cluster.request("rl.echo", b"z", timeout=5).data == b"z"


@pytest.mark.timeout(10)
def test_bad_input_raises_before_connecting_also_after_the_first_request(logger: logging.Logger) -> None:
    """The reply inbox is made once; a later request that finds no client open still
    refuses bad input at once, before it asks to connect (found in review: it was
    validated only when the reply inbox was made). The request's life is driven by
    hand: its first step, with no client, would be CONNECT."""
    from openfactory_nats._receive.replies import Replies

    core = NatsCluster("BI", ["nats://127.0.0.1:1"], logger)
    core.incoming._replies_ready = Replies("BI")  # as after an earlier request
    life = core.incoming.request_life("bi.echo", "not bytes", None, 5.0, time.monotonic)
    with pytest.raises(InvalidTypeError):
        next(life)
    good = core.incoming.request_life("bi.echo", b"ok", None, 5.0, time.monotonic)
    assert next(good)[0] == "connect"  # what a valid request asks for with no client
    good.close()
