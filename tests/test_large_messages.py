"""Large messages: frames that reference the payload instead of copying it, written with
gathered socket writes. What is sent (and replayed) must be exactly what the caller
published, whatever the caller does with its buffer afterwards."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openfactory_nats import SyncNatsCluster
from openfactory_nats._natsio.internals import _gather
from openfactory_nats._wire import SPLIT_PAYLOAD, Frame, build_frame, split_frame

from .servers import NatsServer, TcpProxy
from .test_faults import wait_until

SIZES = (0, 16, 128, 1024, SPLIT_PAYLOAD - 1, SPLIT_PAYLOAD, 16 * 1024, 64 * 1024, 1024 * 1024)


def payload_for(index: int, size: int) -> bytes:
    """A payload whose every byte depends on *index*, so that mix-ups show."""
    seed = b"%08d:" % index
    return (seed * (size // len(seed) + 1))[:size]


subjects = st.from_regex(r"[a-z0-9_-]{1,12}(\.[a-z0-9_-]{1,12}){0,3}", fullmatch=True)
header_maps = st.none() | st.dictionaries(
    st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,10}", fullmatch=True), st.from_regex(r"[ -~]{0,20}", fullmatch=True)
)


@settings(max_examples=200, deadline=None)
@given(subject=subjects, size=st.integers(0, 3 * SPLIT_PAYLOAD), headers=header_maps)
def test_a_split_frame_is_byte_for_byte_the_frame(subject: str, size: int, headers: dict[str, str] | None) -> None:
    payload = payload_for(size, size)
    frame = split_frame(subject, payload, headers, 1 << 30)
    assert bytes(frame) == build_frame(subject, payload, headers, 1 << 30)
    assert len(frame) == len(bytes(frame))
    assert frame.payload is payload  # referenced, not copied


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.sampled_from(SIZES[:-1]), max_size=40))
def test_gathered_buffers_are_the_frames_in_order(sizes: list[int]) -> None:
    frames: list[bytes | Frame] = []
    for i, size in enumerate(sizes):
        payload = payload_for(i, size)
        frames.append(
            split_frame("a.b", payload, None, 1 << 30)
            if size >= SPLIT_PAYLOAD
            else build_frame("a.b", payload, None, 1 << 30)
        )
    buffers = _gather(frames)
    assert b"".join(buffers) == b"".join(bytes(f) for f in frames)
    large = [f.payload for f in frames if isinstance(f, Frame)]
    assert [b for b in buffers if any(b is p for p in large)] == large  # written from where they are


def test_mixed_sizes_from_one_thread_arrive_whole_and_in_order(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(server.url, "big.>")
    sent: list[bytes] = []
    with SyncNatsCluster("C1", [server.url], logger) as nats:
        for i in range(120):
            size = SIZES[i % len(SIZES)]
            payload = payload_for(i, size)
            nats.publish("big.data", payload, headers={"Seq": str(i)} if i % 3 == 0 else None)
            sent.append(payload)
        nats.flush(10)
    messages = sub.wait_for(len(sent), timeout=15)
    assert [bytes(m.data) for m in messages] == sent
    assert [m.headers.get("Seq") if m.headers else None for m in messages][:6] == ["0", None, None, "3", None, None]


@pytest.mark.parametrize("kind", ["bytearray", "memoryview"])
def test_mutating_the_buffer_after_publish_does_not_change_what_is_sent(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any, kind: str
) -> None:
    """The server is paused, so every message still sits in the client's buffers (and
    the socket's) while the caller scribbles over the buffer it published from."""
    sub = subscriber_factory(server.url, "big.>")
    expected: list[bytes] = []
    with SyncNatsCluster("C1", [server.url], logger, timeout=10) as nats:
        nats.connect()
        server.pause()
        try:
            for size in SIZES[1:]:
                buffer = bytearray(payload_for(size, size))
                for i in range(8):  # some 9 MB: more than the sockets hold
                    buffer[:] = payload_for(size + i, size)
                    expected.append(bytes(buffer))
                    nats.publish("big.data", buffer if kind == "bytearray" else memoryview(buffer))
                    buffer[:] = b"\xff" * size  # what must never be seen
        finally:
            server.resume()
        nats.flush(15)
    messages = sub.wait_for(len(expected), timeout=15)
    assert [bytes(m.data) for m in messages] == expected


def test_replayed_large_messages_are_what_was_published(
    server: NatsServer, proxy: TcpProxy, logger: logging.Logger, subscriber_factory: Any
) -> None:
    """Large messages unconfirmed when the connection is cut are sent again; the caller
    reused its buffer in between, and every copy that arrives is the original."""
    sub = subscriber_factory(server.url, "big.>")
    size = 256 * 1024
    expected: set[bytes] = set()
    with SyncNatsCluster("C1", [proxy.url], logger, reconnect_time_wait=0.1, timeout=10) as nats:
        nats.connect()
        buffer = bytearray(size)
        for i in range(200):
            if i == 60:
                proxy.cut()  # with some 15 MB sent, not all of it confirmed yet
            elif i == 100:
                proxy.restore()
            buffer[:] = payload_for(i, size)
            expected.add(bytes(buffer))
            nats.publish("big.data", buffer)
            buffer[:] = b"\xff" * size
        wait_until(lambda: nats.is_connected, timeout=10)
        nats.flush(15)
        stats = nats.stats()
    got = sub.settle(quiet=0.5, timeout=20)
    payloads = [bytes(m.data) for m in got]
    assert set(payloads) == expected  # nothing lost, nothing scribbled over
    assert stats["replayed"] > 0
    assert len(payloads) - len(expected) <= stats["replayed"]  # duplicates only from replay
    assert stats["dropped"] == 0 and stats["dropped_bytes"] == 0
