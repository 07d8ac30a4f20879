"""The few places where the library reaches into nats-py's client.

nats-py builds one protocol frame per ``publish`` and wakes its flusher task each time,
and one message object per received message, queued for its subscription's task. The
fast path instead writes frames built in the publishing threads to the connection in
batches (:func:`write_frames`), after nats-py's own pending commands, and hands each
received message of the library's subscriptions from nats-py's parser straight to its
receiver (:func:`route_messages`). On both paths a received message that cannot be read
is dropped there instead of ending nats-py's read loop (:func:`guard_messages`). It
relies on private attributes of ``nats.aio.client.Client``; :func:`supports_fast_path`
checks that they are there (tested against the nats-py range that ``setup.cfg`` pins),
and the library falls back to the public ``publish`` when they are not, or when
``OPENFACTORY_NATS_PUBLIC_API=1`` is set.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from nats.aio.client import Client
from nats.aio.subscription import Subscription

from .._wire import Frame

__all__ = (
    "abort_transport",
    "buffered_bytes",
    "connection_token",
    "divert_pending",
    "drain_subscription",
    "drop_transport",
    "guard_messages",
    "pending_bytes",
    "same_connection",
    "send_ping",
    "stuck_bytes",
    "supports_fast_path",
    "transport_closing",
    "wait_writable",
    "write_frames",
    "write_room",
    "write_pending_now",
)

_PING = b"PING\r\n"
_CRLF = b"\r\n"
_IOV_MAX = 1024  # buffers per sendmsg (Linux's IOV_MAX)
_OWN_BUFFER = 2048  # frames this large are written from where they are, not joined
#: From 3.12 on, asyncio's socket transport queues what ``writelines`` gets as views.
_QUEUES_VIEWS = sys.version_info >= (3, 12)

_REQUIRED = (
    "_pending",
    "_pending_data_size",
    "_flush_queue",
    "_transport",
    "_status",
    "_pongs",
    "_process_msg",
    "_process_headers",
    "stats",
)


def supports_fast_path() -> bool:
    """Tell whether the installed nats-py exposes what the batched fast path needs."""
    if os.environ.get("OPENFACTORY_NATS_PUBLIC_API", "") not in ("", "0"):
        return False
    probe = Client()
    if not all(hasattr(probe, attr) for attr in _REQUIRED) or not isinstance(probe._pending, list):
        return False
    try:
        sub = Subscription(probe, pending_msgs_limit=0)
    except TypeError:
        return False
    return isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue)


async def drain_subscription(nc: Client, sub: Subscription, timeout: float) -> bool:
    """Unsubscribe *sub* so that what the server sent before is still received: UNSUB,
    then a PING that is never cancelled (the messages routed before the UNSUB arrive
    before its PONG), then forget the subscription. nats-py's own ``drain`` waits with a
    flush that, timed out or cancelled, leaves a cancelled future in its PONG queue and
    so kills its read loop. True when the PONG came within *timeout* s.
    """
    answered = False
    if nc.is_connected:
        await nc._send_unsubscribe(sub._id)
        sent = send_ping(nc)
        if sent is not None:
            done, _ = await asyncio.wait({sent[0]}, timeout=max(0.0, timeout))
            answered = bool(done)
    nc._remove_sub(sub._id)
    sub._closed = True
    return answered


#: ``deliver(subject, reply, data, headers)``: a message of a routed subscription.
Deliver = Callable[[bytes, bytes, bytes, "dict[str, str] | None"], None]
#: ``on_malformed(subject, error)``: a message that could not be read, dropped.
Malformed = Callable[[bytes, Exception], None]
_DOOR = "_openfactory_nats_door"
_ROUTES = "_openfactory_nats_routes"  # the door's routes too (tests look at them)
#: What reading a message the server forwards as it got it may raise: a subject, reply
#: subject or status line that is not UTF-8 (``UnicodeDecodeError``); a header block
#: shorter than its ``NATS/1.0`` line (nats-py's ``_process_headers`` indexes past it).
_MALFORMED = (UnicodeDecodeError, IndexError)


class _Door:
    """The client's messages as nats-py's parser hands them over: the routed
    subscriptions, and who is told of a message that cannot be read."""

    __slots__ = ("on_malformed", "routes")

    def __init__(self) -> None:
        self.routes: dict[int, Deliver] = {}
        self.on_malformed: Malformed | None = None


def _door(nc: Client) -> _Door:
    """The client's :class:`_Door`, put in front of its ``_process_msg`` on first use."""
    door: _Door | None = nc.__dict__.get(_DOOR)
    if door is not None:
        return door
    door = _Door()
    setattr(nc, _DOOR, door)
    setattr(nc, _ROUTES, door.routes)
    routes = door.routes
    original = nc._process_msg
    stats = nc.stats
    process_headers = nc._process_headers

    async def process_msg(sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        try:
            deliver = routes.get(sid)
            if deliver is None:
                await original(sid, subject, reply, data, headers)
                return
            stats["in_msgs"] += 1
            stats["in_bytes"] += len(data)
            deliver(subject, reply, data, await process_headers(headers) if headers else None)
        except _MALFORMED as exc:
            # Raised out of here, it would end nats-py's read loop (see guard_messages).
            # The parser has consumed the message already: it goes on with the next one.
            on_malformed = door.on_malformed
            if on_malformed is not None:
                on_malformed(subject, exc)

    nc._process_msg = process_msg  # type: ignore[method-assign]
    return door


def guard_messages(nc: Client, on_malformed: Malformed) -> None:
    """Drop each message of client *nc* that cannot be read, telling *on_malformed*,
    instead of letting nats-py's read loop end on it. Call before connecting.

    nats-py's parser hands subject, reply subject and header block over as bytes, and
    the server forwards them from any publisher as they came (not UTF-8, a header block
    without its ``NATS/1.0`` line). Decoding them, in nats-py or in the receivers here,
    raises; the exception ends nats-py's read loop (logged to its own logger only): the
    client, still "connected", reads nothing more, neither messages nor PONGs, until its
    pings go unanswered (``ping_interval`` x ``max_outstanding_pings``) and it
    reconnects. Both paths go through here: the fast path's routed subscriptions and
    nats-py's own message processing (the public-API path's callbacks). A nats-py without
    ``_process_msg`` is left as it is.
    """
    if callable(getattr(nc, "_process_msg", None)) and callable(getattr(nc, "_process_headers", None)):
        _door(nc).on_malformed = on_malformed


def route_messages(nc: Client, sid: int, deliver: Deliver | None) -> None:
    """Hand the messages of subscription *sid* to *deliver* as nats-py's parser reads
    them, instead of building a nats-py message each and queueing it (None: stop)."""
    routes = _door(nc).routes
    if deliver is None:
        routes.pop(sid, None)
    else:
        routes[sid] = deliver


def divert_pending(sub: Subscription, queue: Any) -> None:
    """Make nats-py hand the messages of *sub* (a subscription without callback) to
    *queue*, which has ``put_nowait``, ``qsize``, ``empty``, ``task_done`` and an async
    ``join``: the receiver batches them itself instead of nats-py's per-message queue."""
    sub._pending_queue = queue


def write_frames(nc: Client, frames: Sequence[bytes | Frame], nbytes: int) -> None:
    """Write ready-made ``PUB``/``HPUB`` frames to the connection, in order, after what
    nats-py holds in its own pending buffer (so that its commands keep their place).

    Small frames are joined into one buffer (as nats-py's flusher would); larger frames
    and large payloads are not copied: the buffers go to the kernel in gathered
    ``sendmsg`` calls. *nbytes* is the frames' total size. The caller feeds only while
    the client is connected and bounds what the transport holds.
    """
    write_pending_now(nc)
    buffers: list[bytes] | None = None
    if nbytes < _OWN_BUFFER * len(frames):  # mostly small frames: one copy is cheaper
        try:
            buffers = [b"".join(frames)]  # type: ignore[arg-type]
        except TypeError:  # a large payload among them
            pass
    if buffers is None:
        buffers = _gather(frames)
    transport = _asyncio_transport(nc)
    if transport is None:  # another kind of transport (websocket): nats-py's own writer
        if nc._transport is not None:
            nc._transport.writelines(buffers)
    elif _plain_socket(transport):
        _send_gathered(transport, buffers, nbytes)
    else:  # TLS
        transport.writelines(buffers)


def _plain_socket(transport: asyncio.WriteTransport) -> bool:
    """True for asyncio's transport of a plain (not TLS) socket."""
    return isinstance(getattr(transport, "_sock", None), socket.socket)


def transport_closing(nc: Client) -> bool:
    """True when the connection's transport is closing or gone while nats-py may still
    say it is connected (a reset or failed write that its read loop has not seen yet):
    nothing may be written to it any more."""
    transport = _asyncio_transport(nc)
    if transport is None:
        return nc._transport is None
    return transport.is_closing()


def write_room(nc: Client, high_water: int) -> int:
    """How many bytes of frames to write now, keeping what nats-py and the transport hold
    under *high_water*.

    On a plain socket, where frames are sent by :func:`_send_gathered`, nothing is
    written while the transport holds anything: the socket is full, and frames wait
    uncopied in the outbox instead. Its flow control is set to pause at any byte held and
    resume once empty, so that waiting for it (``wait_writable``) ends when the socket
    takes more.
    """
    transport = _asyncio_transport(nc)
    if transport is not None and _plain_socket(transport):
        if transport.get_write_buffer_limits() != (0, 0):
            transport.set_write_buffer_limits(high=0, low=0)
        if transport.get_write_buffer_size():
            return 0
    return high_water - buffered_bytes(nc)


def _gather(frames: Sequence[bytes | Frame]) -> list[bytes]:
    """The buffers to write for *frames*: runs of small frames joined (few buffers make a
    cheap ``sendmsg``); frames of ``_OWN_BUFFER`` bytes or more, and the pieces of the
    frames around large payloads, on their own, uncopied."""
    buffers: list[bytes] = []
    append = buffers.append
    run: list[bytes] = []
    for frame in frames:
        if isinstance(frame, Frame):
            if run:
                append(b"".join(run))
                run = []
            buffers += (frame.head, frame.payload, _CRLF)
        elif len(frame) >= _OWN_BUFFER:
            if run:
                append(b"".join(run))
                run = []
            append(frame)
        else:
            run.append(frame)
    if run:
        append(b"".join(run))
    return buffers


def _send_gathered(transport: asyncio.WriteTransport, buffers: list[bytes], nbytes: int) -> None:
    """Send *buffers* (*nbytes* in all) straight from where they are, in gathered
    ``sendmsg`` calls, while the transport holds nothing, and queue only what the socket
    did not take. asyncio's ``writelines`` joins the buffers into one copy before 3.12,
    and from 3.12 on counts what went out buffer by buffer, in Python; it is used for the
    rest only, there."""
    sock: socket.socket = transport._sock  # type: ignore[attr-defined]
    start = 0
    if not transport.get_write_buffer_size() and not transport.is_closing():
        while start < len(buffers):
            batch = buffers[start : start + _IOV_MAX]
            try:
                sent = sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # The transport meets the error on its own write and reports it (once:
                # the rest goes as one buffer, so that it is not logged once per frame).
                transport.write(b"".join(buffers[start:]))
                return
            if sent == nbytes and start == 0 and len(batch) == len(buffers):
                return  # all of it (the common case: no need to count buffer by buffer)
            while start < len(buffers) and sent >= len(buffers[start]):
                sent -= len(buffers[start])
                start += 1
            if sent:  # one buffer went out in part: queue the rest of it
                buffers[start] = memoryview(buffers[start])[sent:]  # type: ignore[call-overload]
                break
    if _QUEUES_VIEWS:
        # One pass, each buffer kept as a view: a ``write`` per buffer would sum the
        # transport's whole queue each time (quadratic), and keep a bytes object that is
        # copied again at each partial send.
        if start < len(buffers) and not transport.is_closing():
            transport.writelines(buffers[start:])
        return
    for buffer in buffers[start:]:  # (3.11: the transport copies into one bytearray)
        if transport.is_closing():
            break  # lost with the connection: the pump replays or counts what it wrote
        transport.write(buffer)


async def wait_writable(nc: Client) -> None:
    """Wait while the transport's buffer is over its high-water mark (asyncio flow control)."""
    if nc._transport is not None:
        await nc._transport.drain()  # type: ignore[no-untyped-call]


def write_pending_now(nc: Client) -> None:
    """Hand the client's pending buffer to the transport at once.

    ``Client.flush`` writes its PING straight to the socket, ahead of whatever is still
    pending; writing the pending buffer first keeps "flushed" true.
    """
    if nc.is_connected and nc._pending_data_size > 0 and nc._transport and not transport_closing(nc):
        nc._transport.writelines(nc._pending[:])
        nc._pending = []
        nc._pending_data_size = 0


def send_ping(nc: Client) -> tuple[asyncio.Future[Any], object] | None:
    """Write the pending buffer, then a PING; return the future nats-py resolves when
    the PONG arrives and a token naming the connection it went out on (see
    :func:`same_connection`), or None when the client is not connected.

    Unlike ``Client.flush``, nothing here is ever cancelled: a cancelled future left in
    nats-py's PONG queue kills its read loop when the PONG arrives. Callers wait on the
    returned future with ``asyncio.wait`` (which does not cancel it) and forget it when
    its connection is gone; nats-py drops the queue of a lost connection on reconnect.
    """
    if not nc.is_connected or nc._transport is None or transport_closing(nc):
        return None
    write_pending_now(nc)
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    pongs = nc._pongs
    pongs.append(future)
    nc._transport.write(_PING)
    return future, pongs


def connection_token(nc: Client) -> object:
    """An object that names the client's current connection (nats-py starts a new PONG
    queue for each connection it makes, reconnection attempts included)."""
    return nc._pongs


def same_connection(nc: Client, token: object) -> bool:
    """True while the connection a ping's *token* names is still the client's (nats-py
    starts a new PONG queue for every connection it makes)."""
    return nc._pongs is token


def pending_bytes(nc: Client) -> int:
    """Bytes in the client's pending buffer (its reconnect buffer while reconnecting)."""
    return int(nc._pending_data_size)


def _asyncio_transport(nc: Client) -> asyncio.WriteTransport | None:
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    transport = getattr(writer, "transport", None)
    return transport if isinstance(transport, asyncio.WriteTransport) else None


def buffered_bytes(nc: Client) -> int:
    """Bytes held by the client that have not reached the socket: its pending buffer plus
    the transport's write buffer."""
    pending = int(getattr(nc, "_pending_data_size", 0))
    transport = _asyncio_transport(nc)
    if transport is not None and not transport.is_closing():
        pending += transport.get_write_buffer_size()
    return pending


def stuck_bytes(nc: Client) -> int:
    """Bytes still held by the transport of a client that is reconnecting and has begun
    closing it (0 otherwise)."""
    transport = _asyncio_transport(nc)
    if not nc.is_reconnecting or transport is None or not transport.is_closing():
        return 0
    return transport.get_write_buffer_size()


def drop_transport(nc: Client) -> None:
    """Close the client's transport at once, dropping what it holds (nats-py goes on
    reconnecting)."""
    transport = _asyncio_transport(nc)
    if transport is not None:
        transport.abort()


def abort_transport(nc: Client) -> None:
    """Drop the client's connection at once, without flushing (a stalled peer)."""
    transport = _asyncio_transport(nc)
    if transport is not None:
        transport.abort()
    if hasattr(nc, "_status"):
        nc._status = Client.CLOSED
