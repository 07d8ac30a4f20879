"""Races at the edges of the life cycle, each forced deterministically against real
servers: a blocking call racing close(), a connection finishing after close(), a reused
thread id, a late producer racing the final take, a reconnection nats-py abandons."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import deque
from typing import Any

import pytest

from openfactory_nats import (
    ClusterClosedError,
    ClusterState,
    NatsCluster,
    NatsClusterError,
    SyncClusterRouter,
    SyncNatsCluster,
)

from .servers import NatsServer, SilentServer, TcpProxy


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# -- 1. router: a blocking call racing close() ----------------------------------------
@pytest.mark.timeout(30)
def test_router_connect_racing_close_raises_a_documented_error(
    silent_server: SilentServer, logger: logging.Logger
) -> None:
    """SyncClusterRouter._all (_routing/router.py lines 240-246) catches only TimeoutError around
    ``future.result``. When close() stops the shared loop while connect() is waiting,
    the loop's shutdown cancels the task and ``concurrent.futures.CancelledError``
    escapes the public connect() (SyncNatsCluster._call maps the same case)."""
    router = SyncClusterRouter({"C1": [silent_server.url]}, logger, connect_timeout=10, timeout=10)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            router.connect(timeout=10)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=connect)
    thread.start()
    time.sleep(0.5)  # connect() is waiting on the silent server
    router.close(timeout=0.5)
    thread.join(15)
    assert len(outcome) == 1
    assert isinstance(outcome[0], NatsClusterError), repr(outcome[0])


# -- 2. a connection attempt that outlives close() --------------------------------------
@pytest.mark.timeout(30)
def test_connect_that_finishes_after_close_leaves_no_live_client(server: NatsServer, logger: logging.Logger) -> None:
    """_core/cluster.py lines 242-246: when close() gave up waiting for the connect lock (its
    deadline passed) and the attempt then succeeds, ``self.nc = nc`` is set and
    ``_life.connected()`` raises ClusterClosedError, but the new nats-py client is never
    closed: a CLOSED cluster keeps a live connection (reconnecting forever)."""
    proxy = TcpProxy(server.port, delay=0.4)  # a slow link: the handshake takes > 1 s

    async def main() -> Any:
        cluster = NatsCluster("C1", [proxy.url], logger, connect_timeout=10, ping_interval=60)
        attempt = asyncio.ensure_future(cluster.connect())
        await asyncio.sleep(0.2)
        await cluster.close(timeout=0.1)
        assert cluster.state is ClusterState.CLOSED
        with contextlib.suppress(ClusterClosedError):
            await attempt
        await asyncio.sleep(0.5)
        nc = cluster.nc
        live = nc is not None and not nc.is_closed
        if nc is not None:
            await nc.close()
        return live

    try:
        live = asyncio.run(main())
    finally:
        proxy.close()
    assert not live, "a closed cluster still holds an open nats-py client"


# -- 3. the loop thread recognised by a reused thread id --------------------------------
@pytest.mark.timeout(30)
def test_publish_after_close_from_a_thread_reusing_the_loop_threads_id(
    server: NatsServer, logger: logging.Logger
) -> None:
    """_blocking/facade.py lines 80 and 200 recognise the loop thread by ``threading.get_ident()``; the id
    of the ended loop thread is reused by a later thread, which then gets
    WrongThreadError ("cannot be called from the event loop thread") instead of
    ClusterClosedError (the brief's FINDINGS warn about exactly this)."""
    cluster = SyncNatsCluster("C1", [server.url], logger)
    cluster.connect()
    old_ident = cluster._runner.thread.ident
    cluster.close()
    errors: list[BaseException] = []
    reused = False
    for _ in range(200):
        box: list[Any] = []

        def publish(box: list[Any] = box) -> None:
            box.append(threading.get_ident())
            try:
                cluster.publish("x", b"y")
            except BaseException as exc:
                box.append(exc)

        thread = threading.Thread(target=publish)
        thread.start()
        thread.join(5)
        if box[0] == old_ident:
            reused = True
            errors.append(box[1])
            break
    assert reused, "the platform did not reuse the thread id (test not applicable)"
    assert isinstance(errors[0], ClusterClosedError), repr(errors[0])


# -- 4. the outbox's final take racing a late producer's sweep ---------------------------
class _InterleavedDeque(deque):  # type: ignore[type-arg]
    """Plays one legal GIL interleaving: right after the consumer's final take counted the
    items (``len``), a producer that passed the phase check before close() began runs its
    whole ``put`` (append, sees the seal, sweeps), then the consumer pops what it counted."""

    def __init__(self, outbox: Any) -> None:
        super().__init__()
        self.outbox = outbox
        self.fired = False
        self.consumer: int | None = None
        self.producer_error: list[BaseException] = []

    def popleft(self) -> Any:
        if self.outbox._sealed and not self.fired and threading.get_ident() == self.consumer:
            self.fired = True

            def late_producer() -> None:
                try:
                    self.outbox.put(b"PUB late 1\r\nx\r\n", 15, 0.0)
                except BaseException as exc:
                    self.producer_error.append(exc)

            thread = threading.Thread(target=late_producer)
            thread.start()
            thread.join(5)
        return super().popleft()


@pytest.mark.timeout(30)
def test_final_take_racing_a_late_producer_still_ends_closed(server: NatsServer, logger: logging.Logger) -> None:
    """_send/outbox.py lines 446-455 (take) pops ``len(items)`` items, counted once; a producer that
    appended after the seal sweeps the deque concurrently (_send/outbox.py lines 341-355), so the
    consumer's popleft raises IndexError. That escapes Pump.shutdown() inside _close()'s
    finally (_core/cluster.py lines 562), skips ``_life.closed()``: close() raises IndexError (outside
    the documented tree) and the cluster stays CLOSING for good."""

    async def main() -> tuple[BaseException | None, ClusterState, list[BaseException]]:
        cluster = NatsCluster("C1", [server.url], logger, reconnect_time_wait=0.1, drain_timeout=0.3)
        await cluster.connect()
        outbox = cluster._pump.outbox
        hooked = _InterleavedDeque(outbox)
        hooked.consumer = threading.get_ident()
        outbox._items = hooked
        server.kill()  # reconnecting: what is queued stays in the outbox through close()
        while cluster.state is not ClusterState.RECONNECTING:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        cluster.begin_close()
        # A producer that passed offer()'s phase check just before close began appends
        # now; the seal has not happened, so it returns normally (its message is the
        # final take's to hand over or count).
        first = threading.Thread(target=outbox.put, args=(b"PUB early 1\r\nx\r\n", 16, 0.0))
        first.start()
        first.join(5)
        assert len(outbox) == 1
        error: BaseException | None = None
        try:
            await cluster.close(timeout=0.3)
        except BaseException as exc:
            error = exc
        return error, cluster.state, hooked.producer_error

    try:
        error, state, producer_error = asyncio.run(main())
    finally:
        server.start()
    assert producer_error and isinstance(producer_error[0], ClusterClosedError)  # the sweep ran
    assert error is None, repr(error)
    assert state is ClusterState.CLOSED


# -- 5. replay across a reconnection attempt nats-py abandons ---------------------------
class ScriptedProxy:
    """A loopback proxy; the connection numbered *stall* forwards the handshake (up to
    the server's first PONG), then silently drops everything both ways."""

    def __init__(self, target_port: int, stall: int) -> None:
        self.target_port = target_port
        self.stall = stall
        self.stalled = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.url = f"nats://127.0.0.1:{self.port}"
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._count = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            upstream.settimeout(None)
            index = self._count
            self._count += 1
            self._conns.append((client, upstream))
            state = {"dead": False}
            threading.Thread(target=self._pipe, args=(client, upstream, state, False), daemon=True).start()
            threading.Thread(
                target=self._pipe, args=(upstream, client, state, index == self.stall), daemon=True
            ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, state: dict[str, bool], watch: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if state["dead"]:
                    continue  # blackholed: swallow
                dst.sendall(data)
                if watch and b"PONG" in data:
                    state["dead"] = True
                    self.stalled.set()
        except OSError:
            pass

    def cut_first(self) -> None:
        client, upstream = self._conns[0]
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for pair in self._conns:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.close()


@pytest.mark.timeout(60)
def test_messages_handed_to_an_abandoned_reconnection_are_replayed_or_counted(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    """nats-py marks a reconnection CONNECTED in _process_connect_init, before its own
    flush; if that flush times out (the link stalls right after the handshake) it tries
    the next connection without a new disconnected_cb. Frames the pump handed over in
    that window are confirmed by no PONG; Pings.reconnected (_natsio/pings.py lines 573-578) resolves
    their pings False and Pump._on_pong (_send/pump.py lines 277-283) just moves the batches back to
    ``_unconfirmed`` without sending them again, so the next PONG on the new connection
    "confirms" frames that never reached it: flush() succeeds, the messages are lost and
    stats()["dropped"] stays 0, with replay_unconfirmed=True (the default)."""
    sub = subscriber_factory(server.url, "lost.>")
    proxy = ScriptedProxy(server.port, stall=1)
    try:
        with SyncNatsCluster(
            "C1", [proxy.url], logger, reconnect_time_wait=0.1, ping_interval=60, timeout=30
        ) as cluster:
            cluster.connect()
            proxy.cut_first()
            assert proxy.stalled.wait(10)
            wait_until(lambda: cluster.cluster.nc is not None and cluster.cluster.nc.is_connected)
            for i in range(100):
                cluster.publish("lost.x", b"%d" % i)
            time.sleep(0.2)  # handed over and confirmation pings sent on the stalled link
            cluster.flush(30)  # waits for nats-py to give up on the link (10 s) and move on
            got = {int(m.data) for m in sub.settle(quiet=0.5)}
            stats = cluster.stats()
    finally:
        proxy.close()
    assert len(got) + stats["dropped"] >= 100, (len(got), stats)
