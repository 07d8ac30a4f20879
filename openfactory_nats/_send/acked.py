"""Confirmed delivery: publishing into a JetStream stream, de-duplicated by message id."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors

from .._errors import ClusterTimeoutError, InvalidMessageError, InvalidTypeError, PublishError, map_nats_error
from .._redact import redact

__all__ = ("PubAck", "new_msg_id", "publish_acked")

MSG_ID_HEADER = "Nats-Msg-Id"
_PER_TRY = 2.0

# Worth another try with the same message id: the stream de-duplicates what got through.
_RETRYABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.FlushTimeoutError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    asyncio.TimeoutError,
    OSError,
)


@dataclass(frozen=True)
class PubAck:
    """The stream's acknowledgement of a message.

    :ivar stream: the stream that stored it.
    :ivar seq: its sequence number in the stream.
    :ivar duplicate: True when the stream already had this message id (a retry).
    """

    stream: str
    seq: int
    duplicate: bool


def new_msg_id() -> str:
    """A fresh message id for de-duplication."""
    return uuid.uuid4().hex


def check_msg_id(msg_id: object) -> str:
    """Validate a caller's message id (it travels as a header value)."""
    if not isinstance(msg_id, str):
        raise InvalidTypeError(f"msg_id must be str, not {type(msg_id).__name__}")
    if not msg_id.strip() or any(c in msg_id for c in "\r\n\x00"):
        raise InvalidMessageError(f"invalid msg_id {msg_id[:80]!r}")
    return msg_id


async def publish_acked(
    cluster: str,
    jetstream: Callable[[], Any],
    subject: str,
    payload: bytes,
    headers: Mapping[str, str] | None,
    msg_id: str,
    timeout: float,
) -> PubAck:
    """Publish until the stream acknowledges, retrying with the same message id until
    *timeout* seconds have passed.

    :param jetstream: returns the current client's JetStream context, or None while
        there is no usable client.
    :raises ClusterTimeoutError: when no acknowledgement came in time.
    :raises PublishError: when the stream refused the message for good.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    hdrs = {**(headers or {}), MSG_ID_HEADER: msg_id}
    delay = 0.05
    last: BaseException | None = None
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            detail = f"; last error: {redact(str(last) or type(last).__name__)}" if last is not None else ""
            raise ClusterTimeoutError(
                f"cluster {cluster!r}: no acknowledgement for {subject!r} (msg_id {msg_id}) within {timeout:g} s"
                + detail,
                cluster=cluster,
            )
        js = jetstream()
        if js is not None:
            try:
                ack = await js.publish(subject, payload, timeout=min(remaining, _PER_TRY), headers=dict(hdrs))
                return PubAck(stream=ack.stream, seq=ack.seq, duplicate=bool(ack.duplicate))
            except _RETRYABLE as exc:
                last = exc
            except nats.js.errors.APIError as exc:
                raise PublishError(
                    f"cluster {cluster!r}: the stream refused {subject!r}: {exc}", cluster=cluster
                ) from exc
            except nats.errors.Error as exc:  # refused for good (draining, size, ...)
                raise map_nats_error(exc, cluster) from exc
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        delay = min(delay * 2, 0.5)
