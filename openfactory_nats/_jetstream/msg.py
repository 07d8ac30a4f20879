"""A message received from a JetStream consumer, its metadata and its acknowledgements.

Acknowledging is publishing to the message's reply subject (``$JS.ACK.<...>``): ``+ACK``,
``-NAK`` (optionally with a delay), ``+WPI`` (still working: the ack wait starts again) or
``+TERM`` (never redeliver). An ack, nak or term is final: a second one raises
:class:`MsgAlreadyAckedError`; ``in_progress`` may be sent any number of times before.
An acknowledgement is sent like any publish (queued, in order, kept through a
reconnection); one that cannot be sent raises, is counted, and the server redelivers the
message after its ack wait: JetStream delivers at least once.
"""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from .._errors import ConsumerNotFoundError, InvalidMessageError, MsgAlreadyAckedError, NatsClusterError
from .._message import Msg

__all__ = ("ACK", "NAK", "TERM", "WPI", "Acker", "AsyncJsMsg", "JsMsg", "Metadata", "SequencePair", "parse_metadata")

ACK = b"+ACK"
NAK = b"-NAK"
WPI = b"+WPI"
TERM = b"+TERM"

_final_lock = threading.Lock()  # held for a test-and-set: one ack, nak or term per message


@dataclass(frozen=True)
class SequencePair:
    """A message's sequence number in its stream and in its consumer."""

    stream: int
    consumer: int


@dataclass(frozen=True)
class Metadata:
    """What the ack subject of a JetStream message says about it.

    :ivar num_delivered: how many times it has been delivered (1 the first time).
    :ivar num_pending: messages still pending for the consumer after this one.
    :ivar timestamp: when the stream stored it (UTC).
    """

    stream: str
    consumer: str
    sequence: SequencePair
    num_delivered: int
    num_pending: int
    timestamp: datetime.datetime
    domain: str | None = None


def parse_metadata(reply: str | None) -> Metadata:
    """Read a ``$JS.ACK`` subject (the v1 form and the v2 form with domain and account).

    :raises InvalidMessageError: when *reply* is not a JetStream ack subject.
    """
    tokens = reply.split(".") if reply else []
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        tokens = [*tokens[:2], "", "", *tokens[2:]]
    if len(tokens) < 11 or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise InvalidMessageError(f"not a JetStream message (reply subject {str(reply)[:80]!r})")
    try:
        delivered, sseq, cseq, stamp, pending = (int(t) for t in tokens[6:11])
    except ValueError:
        raise InvalidMessageError(f"unreadable JetStream ack subject {str(reply)[:80]!r}") from None
    return Metadata(
        stream=tokens[4],
        consumer=tokens[5],
        sequence=SequencePair(sseq, cseq),
        num_delivered=delivered,
        num_pending=pending,
        timestamp=datetime.datetime.fromtimestamp(stamp / 1e9, tz=datetime.UTC),
        domain=tokens[2] if tokens[2] not in ("", "_") else None,
    )


class Acker(Protocol):
    """How a blocking :class:`JsMsg` sends its acknowledgements (a publish, a request)."""

    def send_ack(self, subject: str, payload: bytes) -> None: ...

    def confirm_ack(self, subject: str, payload: bytes, timeout: float | None) -> None: ...


class AsyncAcker(Protocol):
    """How an :class:`AsyncJsMsg` sends its acknowledgements."""

    async def send_ack(self, subject: str, payload: bytes) -> None: ...

    async def confirm_ack(self, subject: str, payload: bytes, timeout: float | None) -> None: ...


def consumer_gone(cluster: str, reply: str) -> ConsumerNotFoundError:
    """What an acknowledgement nobody confirmed means: the message's consumer is gone."""
    return ConsumerNotFoundError(
        f"cluster {cluster!r}: nobody confirmed the acknowledgement to {reply[:80]!r}: its consumer is gone",
        cluster=cluster,
        code=503,
    )


def _nak_payload(delay: float | None) -> bytes:
    if delay is None:
        return NAK
    if isinstance(delay, bool) or not isinstance(delay, int | float):
        raise InvalidMessageError(f"delay must be a number of seconds, not {type(delay).__name__}")
    if not 0 <= delay < float("inf"):
        raise InvalidMessageError(f"delay must be a finite number of seconds >= 0, not {delay!r}")
    return NAK + b" " + json.dumps({"delay": int(delay * 1e9)}).encode()


class _Base:
    __slots__ = ("_acker", "_final", "_meta", "_msg")

    def __init__(self, msg: Msg, acker: object) -> None:
        self._msg = msg
        self._acker = acker
        self._meta: Metadata | None = None
        #: What ended it (ACK, NAK or TERM), or None.
        self._final: bytes | None = None

    @property
    def subject(self) -> str:
        """The subject the message was published to."""
        return self._msg.subject

    @property
    def data(self) -> bytes:
        """The payload."""
        return self._msg.data

    @property
    def headers(self) -> Mapping[str, str] | None:
        """The headers (read-only), or ``None``."""
        return self._msg.headers

    @property
    def reply(self) -> str:
        """The ack subject."""
        reply = self._msg.reply
        assert reply is not None
        return reply

    @property
    def metadata(self) -> Metadata:
        """Stream, consumer, sequences, delivery count, pending count, timestamp."""
        if self._meta is None:
            self._meta = parse_metadata(self._msg.reply)
        return self._meta

    @property
    def acked(self) -> bool:
        """True once an ack, nak or term was sent (or is being sent)."""
        return self._final is not None

    def _claim(self, kind: bytes) -> None:
        with _final_lock:
            if self._final is not None:
                raise MsgAlreadyAckedError(
                    f"message {self.subject[:80]!r} (reply {self.reply[:80]!r}) was already "
                    f"acknowledged ({self._final.decode()})"
                )
            self._final = kind

    def _release(self) -> None:
        """The acknowledgement could not be sent: the message may be acknowledged again."""
        self._final = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} subject={self.subject!r} reply={self._msg.reply!r} data={len(self.data)} bytes>"


class JsMsg(_Base):
    """A JetStream message for blocking code. Thread-safe.

    Each acknowledgement raises :class:`MsgAlreadyAckedError` when the message was
    already acked, naked or termed, and :class:`ClusterClosedError` (and the other
    publish errors) when it could not be sent: the server then redelivers the message.
    """

    __slots__ = ()

    _acker: Acker

    def _send(self, kind: bytes, payload: bytes) -> None:
        self._claim(kind)
        try:
            self._acker.send_ack(self.reply, payload)
        except NatsClusterError:
            self._release()
            raise

    def ack(self) -> None:
        """Acknowledge: the message is done (queued, as a publish is)."""
        self._send(ACK, ACK)

    def ack_sync(self, timeout: float | None = None) -> None:
        """Acknowledge and wait until the server confirmed it.

        :raises ClusterTimeoutError: when no confirmation came within *timeout* s (the
            ack may still have been applied).
        :raises ConsumerNotFoundError: when the message's consumer is gone.
        """
        self._claim(ACK)
        try:
            self._acker.confirm_ack(self.reply, ACK, timeout)
        except NatsClusterError:
            self._release()
            raise

    def nak(self, delay: float | None = None) -> None:
        """Negative acknowledgement: redeliver the message (after *delay* s, if given)."""
        self._send(NAK, _nak_payload(delay))

    def in_progress(self) -> None:
        """Still working on it: the server restarts the message's ack wait."""
        if self._final is not None:
            raise MsgAlreadyAckedError(f"message {self.subject[:80]!r} was already acknowledged")
        self._acker.send_ack(self.reply, WPI)

    def term(self) -> None:
        """Never redeliver this message."""
        self._send(TERM, TERM)


class AsyncJsMsg(_Base):
    """A JetStream message for asyncio code: the acknowledgements are coroutines."""

    __slots__ = ()

    _acker: AsyncAcker

    async def _send(self, kind: bytes, payload: bytes) -> None:
        self._claim(kind)
        try:
            await self._acker.send_ack(self.reply, payload)
        except NatsClusterError:
            self._release()
            raise

    async def ack(self) -> None:
        """Acknowledge: the message is done."""
        await self._send(ACK, ACK)

    async def ack_sync(self, timeout: float | None = None) -> None:
        """Acknowledge and wait until the server confirmed it."""
        self._claim(ACK)
        try:
            await self._acker.confirm_ack(self.reply, ACK, timeout)
        except NatsClusterError:
            self._release()
            raise

    async def nak(self, delay: float | None = None) -> None:
        """Negative acknowledgement: redeliver (after *delay* s, if given)."""
        await self._send(NAK, _nak_payload(delay))

    async def in_progress(self) -> None:
        """Still working on it: the ack wait starts again."""
        if self._final is not None:
            raise MsgAlreadyAckedError(f"message {self.subject[:80]!r} was already acknowledged")
        await self._acker.send_ack(self.reply, WPI)

    async def term(self) -> None:
        """Never redeliver this message."""
        await self._send(TERM, TERM)
