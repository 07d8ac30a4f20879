"""Writes that meet a connection already gone while nats-py still says "connected",
transports that send only from nats-py's own flusher (websockets), and the partial-send
bookkeeping of ``_send_gathered``.

The window the integration tests open on purpose happens on its own under load: the
transport has lost its socket (peer reset, write error), nats-py's read loop has not run
yet, so ``is_connected`` is still True, and a wake-up (a producer's, ``_poll``, ``_feed``)
writes frames. The tests block the event loop for a moment to put the publishes and the
loss of the socket in that order deterministically. Each failed before the pump stopped
writing to a closing transport (on Python 3.11, 3.12 or both), and the websocket test
before websocket clusters published through nats-py's public API.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from openfactory_nats import SyncNatsCluster
from openfactory_nats._natsio import internals
from openfactory_nats._natsio.internals import _send_gathered

from .servers import NatsServer, TcpProxy, free_port
from .test_faults import wait_until


def payload_for(index: int, size: int) -> bytes:
    seed = b"%08d:" % index
    return (seed * (size // len(seed) + 1))[:size]


# -- the window: socket gone, nats-py not told yet ---------------------------------------
def lose_socket_while_publishing(
    nats: SyncNatsCluster,
    publish: Callable[[], None],
    *,
    wake_queued_first: bool,
    then: Callable[[], object] | None = None,
) -> list[str]:
    """Run *publish* (in this thread) while the event loop is held, then abort the
    client's socket; nats-py only learns of it when its read loop next runs.

    With *wake_queued_first*, the publishes queue their wake-up before the abort (a
    producer's ``call_soon_threadsafe``): it runs after the transport has aborted but
    before the transport's ``connection_lost``. Without it, no wake-up is queued by the
    publishes and one runs right after ``connection_lost`` (as ``_poll`` or ``_feed``
    would), still before nats-py's read loop has noticed anything; or *then* instead.

    Returns what the event loop's selector still watches on behalf of the aborted
    transport once its ``connection_lost`` has run (its socket is closed by then).
    """
    core = nats.cluster
    loop = core._conn.loop
    assert loop is not None and core.nc is not None
    nc = core.nc
    entered, gate, finished = threading.Event(), threading.Event(), threading.Event()
    stale: list[str] = []

    def hold() -> None:
        if not wake_queued_first:
            core._pump.outbox.scheduled = True  # the publishes queue no wake-up of their own
        entered.set()
        gate.wait(5)
        transport = nc._transport._io_writer.transport  # type: ignore[union-attr]
        transport.abort()  # the socket is gone
        if not wake_queued_first:
            loop.call_soon(then or core._pump.on_wake)  # after connection_lost, before nats-py's read loop
        loop.call_soon(look, transport)

    def look(transport: Any) -> None:
        try:
            for fd, key in loop._selector.get_map().items():  # type: ignore[attr-defined]
                for handle in key.data:
                    if handle is not None and getattr(handle._callback, "__self__", None) is transport:
                        stale.append(f"fd {fd}: {handle._callback.__qualname__}")
        finally:
            finished.set()

    loop.call_soon_threadsafe(hold)
    assert entered.wait(5)
    try:
        publish()
    finally:
        gate.set()
    assert finished.wait(5)
    return stale


def loop_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What escaped into the event loop's exception handler."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "asyncio" and r.levelno >= logging.ERROR and "exception" in r.getMessage().lower()
    ]


def test_a_write_racing_the_loss_of_the_socket_is_replayed_not_lost(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """On Python 3.12+ ``write_frames`` calls ``transport.writelines`` on a transport
    whose ``connection_lost`` already ran: asyncio raises AttributeError ('NoneType' has
    no '_add_writer'), which escapes ``Pump.on_wake`` after the frames were taken from
    the outbox and before they were counted in flight or kept for replay. The message is
    lost (at-least-once broken, ``dropped`` stays 0) and its bytes never return to the
    budget, so a later message that fits the buffer can no longer be queued.

    Before this change the same race raised the same AttributeError (logged by the loop)
    from ``send_ping`` -> ``write_pending_now``, but the frames were already counted and
    in nats-py's pending buffer: nothing was lost or leaked."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    sub = subscriber_factory(server.url, "race.>")
    size = 9000
    with SyncNatsCluster(
        "C1", [server.url], logger, reconnect_time_wait=0.05, timeout=2, connect_timeout=2, max_pending_bytes=65536
    ) as nats:
        nats.connect()
        nats.flush(5)

        def publish() -> None:
            for i in range(4):
                nats.publish("race.data", payload_for(i, size))

        lose_socket_while_publishing(nats, publish, wake_queued_first=False)
        wait_until(lambda: nats.is_connected, timeout=10)
        nats.flush(10)
        got = {bytes(m.data) for m in sub.wait_for(4, timeout=5)}
        stats = nats.stats()
        lost = [i for i in range(4) if payload_for(i, size) not in got]
        assert not lost, f"messages {lost} lost, not counted: dropped={stats['dropped']}"
        # The budget is whole again: a message of most of the buffer fits.
        nats.publish("race.big", payload_for(99, 50_000), timeout=2)
        nats.flush(10)
    # (Also before this change, on 3.12+: send_ping -> write_pending_now -> writelines.)
    assert loop_errors(caplog) == []


def test_a_write_racing_the_loss_of_the_socket_does_not_stall_the_reconnection(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """On Python 3.12+ ``transport.writelines`` on an aborted transport (before its
    ``connection_lost``) queues the data and registers a writer for the socket's fd,
    which is never removed: the socket is closed right after, the selector keeps a stale
    key for that fd number, and the next socket that gets the number (nats-py's
    reconnection) never sees its connect complete: the reconnection hangs for a whole
    ``connect_timeout`` (or the key breaks ``add_reader``). Before this change the write
    was nats-py's flusher's, which ran after ``connection_lost`` and caught the error."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    sub = subscriber_factory(server.url, "race.>")
    with SyncNatsCluster("C1", [server.url], logger, reconnect_time_wait=0.05, timeout=2, connect_timeout=4) as nats:
        nats.connect()
        nats.flush(5)

        def publish() -> None:
            for i in range(8):
                nats.publish("race.data", payload_for(i, 8192))

        stale = lose_socket_while_publishing(nats, publish, wake_queued_first=True)
        started = time.monotonic()
        wait_until(lambda: nats.is_connected, timeout=10)
        took = time.monotonic() - started
        nats.flush(10)
        assert len(sub.wait_for(8, timeout=5)) >= 8
    assert loop_errors(caplog) == []
    # The registration left on the closed socket's fd number (deterministic) ...
    assert stale == [], f"the selector still watches a closed socket for the dead transport: {stale}"
    # ... and what it does when nats-py's next socket gets that number (most runs).
    assert took < 2.0, f"reconnecting took {took:.2f} s (connect_timeout 4 s)"


def test_a_write_racing_the_loss_of_the_socket_does_not_flood_the_log(
    server: NatsServer, logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    """On Python 3.11 ``_send_gathered`` hands each gathered buffer to ``transport.write``
    one by one when the transport is closing (or when ``sendmsg`` failed with EPIPE /
    ECONNRESET): after the fifth, asyncio logs "socket.send() raised exception." at
    WARNING for every one of them, i.e. two per large message. Under load this is
    hundreds of lines per disconnect (some 250 per cut measured with two publishing
    threads); the previous code wrote one joined buffer (one line at most)."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    with SyncNatsCluster("C1", [server.url], logger, reconnect_time_wait=0.05, timeout=5, connect_timeout=4) as nats:
        nats.connect()
        nats.flush(5)

        def publish() -> None:
            for i in range(100):
                nats.publish("race.data", payload_for(i, 8192))

        lose_socket_while_publishing(nats, publish, wake_queued_first=True)
        wait_until(lambda: nats.is_connected, timeout=10)
        nats.flush(10)
    noise = [r for r in caplog.records if r.name == "asyncio" and "socket.send() raised exception" in r.getMessage()]
    assert len(noise) <= 5, f"{len(noise)} asyncio warnings for one lost connection"


def test_a_flush_racing_the_loss_of_the_socket_raises_only_documented_errors(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    """``flush()`` (like ``publish(ack=True)`` and ``close()``) calls ``on_wake`` through
    ``pump_to``: on Python 3.12+ the AttributeError of ``transport.writelines`` reaches
    the caller of ``flush()`` (and the message it was flushing is lost). Before this
    change too, through ``send_ping`` -> ``write_pending_now``."""
    from openfactory_nats import NatsClusterError

    sub = subscriber_factory(server.url, "race.>")
    with SyncNatsCluster("C1", [server.url], logger, reconnect_time_wait=0.05, timeout=5, connect_timeout=2) as nats:
        nats.connect()
        nats.flush(5)
        core = nats.cluster
        loop = core._conn.loop
        assert loop is not None
        outcome: list[BaseException | None] = []
        done = threading.Event()

        def start_flush() -> None:
            # Its first step runs now, as a flush() already waiting in pump_to would (a task
            # created here would only start after nats-py's read loop has run).
            if sys.version_info >= (3, 12):
                task = asyncio.Task(core.flush(5), loop=loop, eager_start=True)
            else:
                task = loop.create_task(core.flush(5))

            def finished(t: asyncio.Task[None]) -> None:
                outcome.append(t.exception())
                done.set()

            task.add_done_callback(finished)

        def publish() -> None:
            nats.publish("race.data", payload_for(7, 8192))

        lose_socket_while_publishing(nats, publish, wake_queued_first=False, then=start_flush)
        assert done.wait(10)
        error = outcome[0]
        assert error is None or isinstance(error, NatsClusterError), f"flush() raised {error!r}"
        wait_until(lambda: nats.is_connected, timeout=10)
        nats.flush(5)
        assert payload_for(7, 8192) in {bytes(m.data) for m in sub.wait_for(1, timeout=5)}


@pytest.mark.parametrize("wake_queued_first", [True, False])
def test_without_replay_a_write_racing_the_loss_of_the_socket_is_counted_if_lost(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any, wake_queued_first: bool
) -> None:
    """At-most-once (``replay_unconfirmed=False``): what is lost with the connection must
    be counted. Frames written into a transport that has already lost its socket are
    dropped by asyncio; ``reconcile`` then gives their budget back as if they had been
    sent (``buffered_bytes`` ignores a closing transport) and ``on_disconnected`` finds
    nothing in flight: nothing is counted. Before this change the frames sat in nats-py's
    pending buffer at that moment, so ``reconcile`` kept them in flight and
    ``on_disconnected`` counted them as dropped."""
    sub = subscriber_factory(server.url, "race.>")
    with SyncNatsCluster(
        "C1", [server.url], logger, reconnect_time_wait=0.05, timeout=2, connect_timeout=2, replay_unconfirmed=False
    ) as nats:
        nats.connect()
        nats.flush(5)

        def publish() -> None:
            for i in range(5):
                nats.publish("race.data", payload_for(i, 8192))

        lose_socket_while_publishing(nats, publish, wake_queued_first=wake_queued_first)
        wait_until(lambda: nats.is_connected, timeout=10)
        nats.flush(10)
        got = {bytes(m.data) for m in sub.settle(quiet=0.3, timeout=5)}
        stats = nats.stats()
    lost = [i for i in range(5) if payload_for(i, 8192) not in got]
    assert not lost or stats["dropped_bytes"] > 0, f"messages {lost} lost silently: {stats}"


# -- transports that only send on drain() ------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # aiohttp, about nats-py's ws_connect(timeout=)
def test_messages_over_websocket_are_sent_without_waiting_for_the_ping_interval(
    tmp_path: Any, logger: logging.Logger, subscriber_factory: Any
) -> None:
    """``write_frames`` hands the buffers to nats-py's ``WebSocketTransport.writelines``,
    which only queues them: they are sent by its ``drain()``, which nothing calls any
    more (nats-py's flusher used to, woken by ``append_frames``). The messages wait for
    some nats-py command to drain the queue: its keep-alive PING (``ping_interval``,
    10 s by default; 30 s here), or a PONG to the server's PING (the first comes 2 s
    after connecting, then every 2 minutes by default)."""
    port = free_port()
    conf = tmp_path / "ws.conf"
    conf.write_text(f"websocket {{ port: {port}\n no_tls: true }}\n")
    srv = NatsServer(name="ws", config=str(conf)).start()
    try:
        sub = subscriber_factory(srv.url, "ws.>")
        with SyncNatsCluster(
            "W", [f"ws://127.0.0.1:{port}"], logger, timeout=5, connect_timeout=5, ping_interval=30
        ) as nats:
            nats.connect()
            time.sleep(2.5)  # past the server's first PING (2 s after connecting), whose PONG drains
            for i in range(4):
                nats.publish("ws.data", payload_for(i, 10_000 if i % 2 else 100))
            assert len(sub.wait_for(4, timeout=3)) == 4, "not sent within 3 s"
    finally:
        srv.close()


# -- _send_gathered: partial sends, batches, errors (pure logic) ----------------------------
class FakeSocket(socket.socket):
    """A socket whose ``sendmsg`` takes at most the next of *accepts* bytes (an int), or
    raises it (an exception); BlockingIOError once they run out."""

    def __init__(self, accepts: list[Any]) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.accepts = list(accepts)
        self.sent = bytearray()
        self.calls: list[int] = []

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        buffers = list(buffers)
        self.calls.append(len(buffers))
        if not self.accepts:
            raise BlockingIOError(errno.EAGAIN, "would block")
        step = self.accepts.pop(0)
        if isinstance(step, BaseException):
            raise step
        data = b"".join(bytes(b) for b in buffers)[:step]
        self.sent += data
        return len(data)


class FakeTransport(asyncio.WriteTransport):
    def __init__(self, sock: FakeSocket, held: int = 0, closing: bool = False) -> None:
        super().__init__()
        self._sock = sock
        self.written = bytearray()
        self.held = held
        self.closing = closing

    def get_write_buffer_size(self) -> int:
        return self.held + len(self.written)

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: Any) -> None:
        self.written += bytes(data)


def buffers_for(count: int, seed: int = 0) -> list[bytes]:
    return [payload_for(seed + i, 1 + (i * 7919) % 9000) for i in range(count)]


@pytest.mark.parametrize("accepts", [[0], [1], [5], [4096, 1], [10_000, 3, 7, 100_000], [10**9]])
def test_send_gathered_sends_every_byte_once_in_order(accepts: list[int]) -> None:
    buffers = buffers_for(40)
    whole = b"".join(buffers)
    with FakeSocket(accepts) as sock:
        transport = FakeTransport(sock)
        _send_gathered(transport, list(buffers), sum(map(len, buffers)))
        assert bytes(sock.sent + transport.written) == whole


def test_send_gathered_batches_at_most_iov_max_buffers_and_resumes_after_a_full_batch() -> None:
    buffers = [b"ab"] * (2 * internals._IOV_MAX + 3)
    whole = b"".join(buffers)
    with FakeSocket([10**9, 10**9, 10**9]) as sock:
        transport = FakeTransport(sock)
        _send_gathered(transport, list(buffers), sum(map(len, buffers)))
        assert sock.calls == [internals._IOV_MAX, internals._IOV_MAX, 3]
        assert bytes(sock.sent) == whole and not transport.written


@pytest.mark.parametrize("exc", [BrokenPipeError(errno.EPIPE, "pipe"), ConnectionResetError(errno.ECONNRESET, "rst")])
def test_send_gathered_hands_everything_unsent_to_the_transport_after_an_error(exc: OSError) -> None:
    buffers = buffers_for(30)
    with FakeSocket([12_345, exc]) as sock:
        transport = FakeTransport(sock)
        _send_gathered(transport, list(buffers), sum(map(len, buffers)))
        assert bytes(sock.sent + transport.written) == b"".join(buffers)


def test_send_gathered_writes_behind_what_the_transport_holds() -> None:
    buffers = buffers_for(5)
    with FakeSocket([10**9]) as sock:
        transport = FakeTransport(sock, held=1)
        _send_gathered(transport, list(buffers), sum(map(len, buffers)))
        assert not sock.calls and bytes(transport.written) == b"".join(buffers)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux socket semantics")
def test_send_gathered_on_a_real_socketpair_with_a_small_send_buffer() -> None:
    """A real non-blocking socket that takes part of the data: nothing lost, nothing
    doubled, the rest queued in the transport."""
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.setblocking(False)
        buffers = buffers_for(200)
        transport = FakeTransport(a)  # type: ignore[arg-type]
        _send_gathered(transport, list(buffers), sum(map(len, buffers)))
        b.setblocking(False)
        received = bytearray()
        while True:
            try:
                chunk = b.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            received += chunk
        assert bytes(received + transport.written) == b"".join(buffers)
        assert transport.written  # the socket did not take it all


# -- a lost connection whose peer stopped reading ------------------------------------------
def test_a_lost_connection_whose_peer_stopped_reading_does_not_stall_the_reconnection(
    server: NatsServer, proxy: TcpProxy, logger: logging.Logger, subscriber_factory: Any
) -> None:
    """nats-py, before reconnecting, waits until the old transport has written what it
    holds: into a peer that reads nothing any more, for ever. The transport is dropped
    instead (its frames are replayed), and the client reconnects."""
    sub = subscriber_factory(server.url, "big.>")
    size = 256 * 1024
    with SyncNatsCluster("C1", [proxy.url], logger, reconnect_time_wait=0.1, timeout=10) as nats:
        nats.connect()
        proxy.stall()
        for i in range(80):  # some 20 MB: more than the sockets take, the rest held by the client
            nats.publish("big.data", payload_for(i, size))
        wait_until(lambda: nats.stats()["unsent_bytes"] > 4 * size, timeout=10)
        proxy.hang_up()  # EOF for the client, whose transport still holds bytes
        wait_until(lambda: nats.stats()["reconnects"] >= 1, timeout=10)
        nats.flush(15)
    got = {bytes(m.data) for m in sub.settle(quiet=0.5, timeout=20)}
    assert got == {payload_for(i, size) for i in range(80)}
