"""The write path on every interpreter CI runs (3.11, 3.12, 3.13): the library's gathered
``sendmsg`` for plain-socket transports, a large frame's pieces as their own buffers,
more buffers than one ``sendmsg`` takes, partial sends and what the transport queues,
TLS, replay through a stalled then lost link, and every path through ``offer``."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest

from openfactory_nats import BufferFullError, ClusterClosedError, InvalidMessageError, SyncNatsCluster
from openfactory_nats._natsio import internals
from openfactory_nats._natsio.internals import _gather, _send_gathered
from openfactory_nats._wire import SPLIT_PAYLOAD, Frame, build_frame, frame_size, split_frame

from .load import publish_until_closed
from .servers import NatsServer, TcpProxy
from .test_faults import wait_until


def payload_for(index: int, size: int) -> bytes:
    seed = b"%08d:" % index
    return (seed * (size // len(seed) + 1))[:size]


def client_transport(nats: SyncNatsCluster) -> Any:
    nc = nats.cluster.nc
    assert nc is not None
    return nc._transport._io_writer.transport  # type: ignore[union-attr]


def shrink_send_buffer(nats: SyncNatsCluster, size: int = 4096) -> None:
    """Make the client's socket take little at a time: partial sends and EAGAIN."""
    sock = client_transport(nats).get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class Spy:
    """Records what ``write_frames`` hands to ``_send_gathered``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[int] = []
        self.durations: list[tuple[float, int]] = []
        self.left_to_transport = 0
        real = internals._send_gathered

        def spy(transport: Any, buffers: list[bytes], nbytes: int) -> None:
            self.calls.append(len(buffers))
            before = transport.get_write_buffer_size()
            t = time.perf_counter()
            real(transport, buffers, nbytes)
            self.durations.append((time.perf_counter() - t, len(buffers)))
            if transport.get_write_buffer_size() > before:
                self.left_to_transport += 1

        monkeypatch.setattr(internals, "_send_gathered", spy)


def budget_is_whole(nats: SyncNatsCluster) -> bool:
    """Nothing in flight and the outbox's budget back to its capacity (this thread's
    unspent lease and returns included)."""
    outbox = nats.cluster._pump.outbox
    lease = getattr(outbox._tls, "lease", None)
    leased = lease.left if lease is not None else 0
    returned = sum(outbox._returns)
    return nats.cluster._pump.in_flight == 0 and outbox.available + leased + returned == outbox.capacity


# -- _send_gathered on asyncio's real transports (bytearray on 3.11, deque from 3.12) --
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sndbuf", [2048, 65536])
def test_send_gathered_on_a_real_transport_with_more_than_iov_max_buffers(sndbuf: int) -> None:
    """More than 1024 buffers (three per large frame), a socket that takes part of them:
    asyncio's own transport (whose buffer is a deque of memoryviews from 3.12) receives
    the remainder; every byte arrives once, in order, and the transport empties."""

    async def run() -> tuple[bytes, bytes, int]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=a)
        transport.set_write_buffer_limits(0, 0)
        frames: list[bytes | Frame] = []
        for i in range(1500):
            if i % 2:
                frames.append(split_frame("a.b", payload_for(i, SPLIT_PAYLOAD + i % 7), None, 1 << 30))
            else:
                frames.append(build_frame("a.b", payload_for(i, 20), None, 1 << 30))
        buffers = _gather(frames)
        assert len(buffers) > 2 * internals._IOV_MAX
        whole = b"".join(bytes(f) for f in frames)
        _send_gathered(transport, buffers, sum(map(len, frames)))
        held = transport.get_write_buffer_size()
        b.setblocking(False)
        got = bytearray()
        deadline = loop.time() + 20
        while len(got) < len(whole) and loop.time() < deadline:
            try:
                chunk = b.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            got += chunk
        await asyncio.sleep(0.01)
        left = transport.get_write_buffer_size()
        transport.close()
        b.close()
        assert held > 0 or sndbuf > 4096
        return bytes(got), whole, left

    got, whole, left = asyncio.run(run())
    assert len(got) == len(whole) and got == whole
    assert left == 0


# -- the whole path, partial sends and EAGAIN on every interpreter -------------------------
SIZES = (10, 1500, 2100, SPLIT_PAYLOAD - 1, SPLIT_PAYLOAD, 5000, 70_000, 150_000)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("replay", [True, False])
def test_mixed_sizes_through_a_tiny_send_buffer_arrive_once_in_order_and_are_accounted(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any, monkeypatch: pytest.MonkeyPatch, replay: bool
) -> None:
    """A client socket that takes 4 KiB at a time and a slow peer: sendmsg is partial or
    would block on nearly every write, the rest goes through the transport. Every message
    arrives exactly once and in order; stats count every message and frame byte once;
    once flushed, nothing is in flight and the budget is whole."""
    spy = Spy(monkeypatch)
    sub = subscriber_factory(server.url, "mix.>")
    proxy = TcpProxy(server.port, delay=0.0005)
    expected: list[bytes] = []
    frame_bytes = 0
    try:
        with SyncNatsCluster(
            "C1", [proxy.url], logger, timeout=30, max_pending_bytes=8 * 1024 * 1024, replay_unconfirmed=replay
        ) as nats:
            nats.connect()
            shrink_send_buffer(nats)
            for i in range(320):
                size = SIZES[i % len(SIZES)]
                payload = payload_for(i, size)
                headers = {"Seq": str(i)} if i % 3 == 0 else None
                nats.publish("mix.data", payload, headers=headers)
                expected.append(payload)
                frame_bytes += frame_size("mix.data", payload, headers, 1 << 30)
            nats.flush(60)
            stats = nats.stats()
            wait_until(lambda: budget_is_whole(nats), timeout=5)
        messages = sub.wait_for(len(expected), timeout=30)
        got = [bytes(m.data) for m in sub.settle(quiet=0.3, timeout=5)]
    finally:
        proxy.close()
    assert len(messages) >= len(expected)
    assert got == expected
    assert stats["published"] == len(expected)
    assert stats["bytes"] == frame_bytes
    assert stats["dropped"] == 0 and stats["dropped_bytes"] == 0 and stats["replayed"] == 0
    assert spy.left_to_transport > 0  # the socket did take part only (the case under test)


@pytest.mark.timeout(120)
def test_a_replay_of_more_than_iov_max_buffers_through_a_stalled_then_lost_link_loses_nothing(
    server: NatsServer,
    proxy: TcpProxy,
    logger: logging.Logger,
    subscriber_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Alternating 4 KiB and tiny messages (four buffers per pair): what the dead socket
    took is replayed in slices of up to 4 MiB, i.e. some 4000 buffers per write, split in
    sendmsg batches of 1024 on a socket that takes part. Nothing is lost; duplicates only
    from the replay; the budget comes back whole."""
    spy = Spy(monkeypatch)
    sub = subscriber_factory(server.url, "rep.>")
    count = 6000
    expected = [payload_for(i, SPLIT_PAYLOAD if i % 2 else 12) for i in range(count)]
    with SyncNatsCluster("C1", [proxy.url], logger, reconnect_time_wait=0.1, timeout=20) as nats:
        nats.connect()
        nats.flush(5)
        proxy.stall()
        for payload in expected:
            nats.publish("rep.data", payload)
        wait_until(lambda: nats.stats()["unsent_bytes"] > 1024 * 1024, timeout=10)
        proxy.hang_up()
        wait_until(lambda: nats.stats()["reconnects"] >= 1, timeout=15)
        nats.flush(30)
        stats = nats.stats()
        wait_until(lambda: budget_is_whole(nats), timeout=5)
    got = [bytes(m.data) for m in sub.settle(quiet=0.5, timeout=30)]
    assert set(got) == set(expected)
    assert stats["replayed"] > 0
    assert len(got) - len(expected) <= stats["replayed"]
    assert stats["dropped"] == 0 and stats["dropped_bytes"] == 0
    assert max(spy.calls) > internals._IOV_MAX, max(spy.calls)  # the case under test


# -- TLS: still asyncio's writelines, never the raw socket ----------------------------------
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.timeout(90)
def test_large_frames_over_tls_arrive_whole_and_in_order(
    tmp_path: Path, tls_files: tuple[Path, Path], logger: logging.Logger, subscriber_factory: Any
) -> None:
    """On TLS the frames go through the TLS transport's ``writelines`` (plain bytes
    gathered on the raw socket would break the TLS stream). The server is paused so that
    the TLS transport holds bytes between writes."""
    cert, key = tls_files
    conf = tmp_path / "tls.conf"
    conf.write_text(f'tls {{ cert_file: "{cert}"\n key_file: "{key}" }}\n')
    srv = NatsServer(name="tls", config=str(conf)).start()
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        received: list[bytes] = []

        async def listen(ready: asyncio.Event, stop: asyncio.Event) -> None:
            nc = await nats_py.connect(f"tls://127.0.0.1:{srv.port}", tls=ctx)

            async def on_msg(msg: Any) -> None:
                received.append(bytes(msg.data))

            await nc.subscribe("tls.>", cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
            await nc.flush()
            ready.set()
            await stop.wait()
            await nc.flush()
            await nc.close()

        loop = asyncio.new_event_loop()
        ready, stop = asyncio.Event(), asyncio.Event()
        thread = threading.Thread(target=loop.run_until_complete, args=(listen(ready, stop),), daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not ready.is_set():
                assert time.monotonic() < deadline
                time.sleep(0.01)
            expected: list[bytes] = []
            with SyncNatsCluster("T", [f"tls://127.0.0.1:{srv.port}"], logger, timeout=30, tls=ctx) as nats:
                nats.connect()
                transport = client_transport(nats)
                assert getattr(transport, "_sock", None) is None  # the TLS transport, not the socket's
                srv.pause()
                try:
                    for i in range(120):
                        payload = payload_for(i, SIZES[i % len(SIZES)])
                        nats.publish("tls.data", payload)
                        expected.append(payload)
                finally:
                    srv.resume()
                nats.flush(30)
                stats = nats.stats()
            deadline = time.monotonic() + 20
            while len(received) < len(expected) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            loop.close()
    finally:
        srv.close()
    assert received == expected
    assert stats["dropped"] == 0 and stats["replayed"] == 0


# -- offer's early returns ------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_offer_counts_every_refusal_once_and_nothing_else(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    """Small (early return), split (4 KiB .. 64 KiB) and reserved (> 64 KiB) payloads:
    a full buffer refuses each with BufferFullError, counted once in ``refused``; invalid
    messages raise their own errors and are not counted; what was accepted all arrives;
    after close every path raises ClusterClosedError, not counted either."""
    sub = subscriber_factory(server.url, "off.>")
    accepted: list[bytes] = []
    with SyncNatsCluster("C1", [server.url], logger, timeout=5, max_pending_bytes=256 * 1024) as nats:
        nats.connect()
        nats.flush(5)
        server.pause()
        try:
            i = 0
            for fill in (8192, 10):  # fill the budget (and the sockets), then its last bytes
                full = False
                while not full:
                    payload = payload_for(i, fill)
                    try:
                        nats.publish("off.data", payload, timeout=0.2)
                    except BufferFullError:
                        full = True
                    else:
                        accepted.append(payload)
                        i += 1
                        assert i < 100_000
            refused = nats.stats()["refused"]
            assert refused == 2
            for size in (10, SPLIT_PAYLOAD - 1, SPLIT_PAYLOAD, 60_000, 70_000, 200_000):
                with pytest.raises(BufferFullError):
                    nats.publish("off.data", payload_for(size, size), timeout=0)
                refused += 1
                assert nats.stats()["refused"] == refused, size
            for bad in ("off..data", "off.*"):
                for size in (10, 5000, 70_000):
                    with pytest.raises(InvalidMessageError):
                        nats.publish(bad, payload_for(size, size), timeout=0)
            with pytest.raises(InvalidMessageError):
                nats.publish("off.data", b"x" * (2 * 1024 * 1024), timeout=0)  # over max_payload (1 MiB)
            with pytest.raises(TypeError):
                nats.publish("off.data", "text", timeout=0)  # type: ignore[call-overload]
            assert nats.stats()["refused"] == refused
        finally:
            server.resume()
        nats.flush(15)
        wait_until(lambda: budget_is_whole(nats), timeout=5)
        stats = nats.stats()
    for size in (10, 5000, 70_000):
        with pytest.raises(ClusterClosedError):
            nats.publish("off.data", payload_for(size, size), timeout=0)
    assert nats.stats()["refused"] == stats["refused"]
    got = [bytes(m.data) for m in sub.settle(quiet=0.3, timeout=15)]
    assert got == accepted
    assert stats["published"] == len(accepted) and stats["dropped"] == 0


# -- the cost of queueing the remainder on 3.12+ transports ---------------------------------
async def _full_transport(sndbuf: int = 4096) -> tuple[asyncio.Transport, socket.socket]:
    """asyncio's own transport over a socket that takes nothing more (its buffer is full)."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    a.setblocking(False)
    try:
        while True:
            a.send(b"z" * 65536)
    except BlockingIOError:
        pass
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=a)
    transport.set_write_buffer_limits(0, 0)  # as write_room sets them
    return transport, b


def _replay_slice() -> tuple[list[bytes | Frame], int]:
    """What one replay slice (``room`` up to 4 MiB) may hold: tiny and 4 KiB messages
    alternating, four buffers per pair, some 4000 in all."""
    frames: list[bytes | Frame] = []
    for i in range(1000):
        frames.append(build_frame("a.b", payload_for(i, 12), None, 1 << 30))
        frames.append(split_frame("a.b", payload_for(i, SPLIT_PAYLOAD), None, 1 << 30))
    return frames, sum(map(len, frames))


@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.version_info < (3, 12), reason="3.11's transport queues into one bytearray: len() is O(1)")
def test_queueing_what_the_socket_did_not_take_is_one_pass_over_the_buffers() -> None:
    """When the socket takes nothing (or part), the rest goes to the transport. From
    Python 3.12 its buffer is a deque and every ``write`` runs ``_maybe_pause_protocol``,
    i.e. ``get_write_buffer_size()`` = ``sum(map(len, deque))``: a ``write`` per buffer
    makes queueing n buffers O(n^2), on the event loop (4000 buffers: 143 ms instead of
    0.7 ms, measured). Counted here instead of timed: the queue is summed a bounded
    number of times, not once per buffer."""

    async def run() -> tuple[int, int]:
        transport, peer = await _full_transport()
        frames, nbytes = _replay_slice()
        buffers = _gather(frames)
        summed = [0]
        size_of_queue = transport.get_write_buffer_size

        def counting() -> int:
            summed[0] += 1
            return size_of_queue()

        transport.get_write_buffer_size = counting  # type: ignore[method-assign]
        _send_gathered(transport, buffers, nbytes)
        held = size_of_queue()
        transport.abort()
        peer.close()
        return summed[0], held

    summed, held = asyncio.run(run())
    assert held > 0  # the socket was full: the rest was queued
    assert summed <= 10, f"the transport's queue was summed {summed} times for 4000 buffers"


@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.version_info < (3, 12), reason="3.11's transport copies into a bytearray by design")
def test_large_payloads_queued_in_a_312_transport_are_not_copied_on_each_partial_send() -> None:
    """Python 3.12+'s transport keeps what it holds uncopied (a deque), and after a partial
    send keeps the rest as ``b[n:]``: a view for what ``writelines`` queued (it wraps each
    buffer in a memoryview), but a new ``bytes`` copy for what ``write`` queued behind
    other bytes. ``_send_gathered`` queues every large payload after the first with
    ``write``: each partial send of it copies its remainder (up to a payload, twice at a
    moment; O(size^2 / chunk) bytes copied per payload) on the event loop."""

    async def run() -> int:
        transport, peer = await _full_transport(16384)
        frames: list[bytes | Frame] = [split_frame("a.b", bytes([65 + k]) * (4 << 20), None, 1 << 30) for k in range(3)]
        _send_gathered(transport, _gather(frames), sum(map(len, frames)))
        done = threading.Event()
        peer.settimeout(0.1)

        def read() -> None:
            while not done.is_set():
                try:
                    peer.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return

        reader = threading.Thread(target=read, daemon=True)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            reader.start()
            deadline = time.monotonic() + 20
            while transport.get_write_buffer_size() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0)
            peak = tracemalloc.get_traced_memory()[1] - base
            assert not transport.get_write_buffer_size()
        finally:
            tracemalloc.stop()
            done.set()
            if reader.is_alive():
                reader.join(5)
            transport.abort()
            peer.close()
        return peak

    peak = asyncio.run(run())
    assert peak < 1 << 20, f"{peak / 2**20:.1f} MiB allocated while the transport sent three 4 MiB payloads"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("replay", [True, False])
def test_publishes_of_every_offer_path_racing_close_are_delivered_counted_or_refused(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any, replay: bool
) -> None:
    """The three ways through ``offer`` (small: early return; split; reserved above
    64 KiB) from threads racing ``close()``: each publish returns or raises
    ClusterClosedError; every one that returned arrives or is counted as dropped; per
    thread what arrives is in order."""
    sub = subscriber_factory(server.url, "race.>")
    cluster = SyncNatsCluster("C1", [server.url], logger, replay_unconfirmed=replay)
    cluster.connect()
    sizes = (16, SPLIT_PAYLOAD, 20_000, 100_000)
    accepted, errors = publish_until_closed(
        cluster, 3, lambda t, n: b"%d;" % n + b"x" * sizes[(n + t) % len(sizes)], run_for=0.4
    )
    assert not errors and len(accepted) == 3, errors
    got = sub.settle(quiet=0.5, timeout=20)
    stats = cluster.stats()
    total = sum(accepted.values())
    assert len(got) + stats["dropped"] >= total, (len(got), stats, total)
    for t in range(3):
        seqs = [int(bytes(m.data).split(b";")[0]) for m in got if m.subject == f"race.{t}"]
        assert seqs == sorted(seqs)
        if not replay:
            assert len(seqs) == len(set(seqs))
