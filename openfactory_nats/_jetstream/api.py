"""The JetStream JSON API: request subjects, configurations and replies, without I/O.

Requests go to ``$JS.API.<...>`` subjects through the cluster's own request path; this
module builds their payloads and reads their answers, raising the library's errors for
the API's (``{"error": {"code", "err_code", "description"}}``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._errors import (
    ConsumerNotFoundError,
    InvalidMessageError,
    InvalidTypeError,
    JetStreamError,
    StreamNotFoundError,
)
from .._filters import validate_filter

__all__ = (
    "API",
    "Call",
    "add_consumer_call",
    "add_stream_call",
    "consumer_info_call",
    "delete_consumer_call",
    "delete_stream_call",
    "merged",
    "next_subject",
    "stream_for_call",
    "stream_info_call",
    "update_stream_call",
    "ConsumerInfo",
    "StreamInfo",
    "check_name",
    "consumer_config",
    "parse_reply",
    "stream_config",
)

API = "$JS.API."
STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014
_NS = 1_000_000_000
_DELIVER = ("all", "last", "new", "last_per_subject", "by_start_sequence")
_STORAGE = ("file", "memory")
_SECONDS = ("max_age", "duplicate_window")  # stream options given in seconds, sent in ns


def check_name(kind: str, name: object) -> str:
    """A stream or consumer name: printable, no whitespace, ``.``, ``*``, ``>`` or path separators."""
    if not isinstance(name, str):
        raise InvalidTypeError(f"{kind} name must be str, not {type(name).__name__}")
    if not name or len(name) > 255 or any(c in name for c in ".*>/\\") or any(c.isspace() or ord(c) < 32 for c in name):
        raise InvalidMessageError(f"invalid {kind} name {name[:80]!r}")
    return name


def _seconds(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    if not value >= 0 or value == float("inf"):
        raise InvalidMessageError(f"{what} must be a finite number of seconds >= 0, not {value!r}")
    return int(value * _NS)


def stream_config(
    name: str, subjects: Sequence[str] | None, storage: str | None, options: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``StreamConfig`` of a create or update request. *options* are the server's
    field names (``retention``, ``max_msgs``, ``max_bytes``, ``num_replicas``,
    ``discard``, ...); ``max_age`` and ``duplicate_window`` are in seconds here."""
    config: dict[str, Any] = {"name": check_name("stream", name)}
    if subjects is not None:
        if isinstance(subjects, str) or not isinstance(subjects, Sequence):
            raise InvalidTypeError("subjects must be a list of str")
        config["subjects"] = [validate_filter(s) for s in subjects]
    if storage is not None:
        if storage not in _STORAGE:
            raise InvalidMessageError(f"storage must be 'file' or 'memory', not {storage!r}")
        config["storage"] = storage
    for key, value in options.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise InvalidMessageError(f"invalid stream option {key!r}")
        config[key] = _seconds(key, value) if key in _SECONDS else value
    try:
        json.dumps(config)
    except (TypeError, ValueError) as exc:
        raise InvalidTypeError(f"stream options must be JSON values: {exc}") from None
    return config


def consumer_config(
    durable: str | None,
    filter_subject: str,
    *,
    ack_wait: float,
    max_deliver: int | None,
    deliver_policy: str,
    opt_start_seq: int | None = None,
    inactive_threshold: float | None = None,
    max_ack_pending: int | None = None,
) -> dict[str, Any]:
    """The ``ConsumerConfig`` of a pull consumer with explicit acks."""
    config: dict[str, Any] = {
        "ack_policy": "explicit",
        "filter_subject": validate_filter(filter_subject),
        "ack_wait": _seconds("ack_wait", ack_wait),
    }
    if durable is not None:
        config["durable_name"] = check_name("consumer", durable)
    if config["ack_wait"] <= 0:
        raise InvalidMessageError("ack_wait must be > 0")
    if deliver_policy not in _DELIVER:
        raise InvalidMessageError(f"deliver_policy must be one of {', '.join(_DELIVER)}, not {deliver_policy!r}")
    config["deliver_policy"] = deliver_policy
    if deliver_policy == "by_start_sequence":
        if not isinstance(opt_start_seq, int) or isinstance(opt_start_seq, bool) or opt_start_seq < 1:
            raise InvalidMessageError("deliver_policy 'by_start_sequence' needs opt_start_seq >= 1")
        config["opt_start_seq"] = opt_start_seq
    for what, value in (("max_deliver", max_deliver), ("max_ack_pending", max_ack_pending)):
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidTypeError(f"{what} must be int or None, not {type(value).__name__}")
            if value < 1:
                raise InvalidMessageError(f"{what} must be >= 1, not {value}")
            config[what] = value
    if inactive_threshold is not None:
        config["inactive_threshold"] = _seconds("inactive_threshold", inactive_threshold)
    return config


def parse_reply(data: bytes, cluster: str, what: str) -> dict[str, Any]:
    """The JSON answer of an API request, or the error it stands for.

    :raises StreamNotFoundError, ConsumerNotFoundError, JetStreamError: as the API says.
    """
    try:
        body = json.loads(data)
    except ValueError:
        raise JetStreamError(f"cluster {cluster!r}: {what}: unreadable JetStream reply", cluster=cluster) from None
    if not isinstance(body, dict):
        raise JetStreamError(f"cluster {cluster!r}: {what}: unexpected JetStream reply", cluster=cluster)
    error = body.get("error")
    if isinstance(error, dict):
        code = int(error.get("code", 0) or 0)
        err_code = int(error.get("err_code", 0) or 0)
        description = str(error.get("description", ""))
        kind: type[JetStreamError] = JetStreamError
        if err_code == STREAM_NOT_FOUND:
            kind = StreamNotFoundError
        elif err_code == CONSUMER_NOT_FOUND:
            kind = ConsumerNotFoundError
        raise kind(
            f"cluster {cluster!r}: {what}: {description} (code {code}, err_code {err_code})",
            cluster=cluster,
            code=code,
            err_code=err_code,
            description=description,
        )
    return body


@dataclass(frozen=True)
class StreamInfo:
    """A stream's configuration and state, as the server reported them.

    :ivar config: the configuration (the server's field names; durations in ns).
    """

    name: str
    config: Mapping[str, Any]
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    consumer_count: int
    raw: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_reply(cls, body: Mapping[str, Any]) -> StreamInfo:
        config = body.get("config") or {}
        state = body.get("state") or {}
        return cls(
            name=str(config.get("name", "")),
            config=config,
            messages=int(state.get("messages", 0)),
            bytes=int(state.get("bytes", 0)),
            first_seq=int(state.get("first_seq", 0)),
            last_seq=int(state.get("last_seq", 0)),
            consumer_count=int(state.get("consumer_count", 0)),
            raw=body,
        )


@dataclass(frozen=True)
class ConsumerInfo:
    """A consumer's configuration and state, as the server reported them.

    :ivar num_pending: messages in the stream not yet delivered to it.
    :ivar num_ack_pending: messages delivered and not yet acknowledged.
    :ivar num_redelivered: messages delivered more than once and not yet acknowledged.
    :ivar num_waiting: pull requests waiting on the server.
    :ivar ack_floor: the stream sequence below which everything is acknowledged.
    """

    stream: str
    name: str
    config: Mapping[str, Any]
    num_pending: int
    num_ack_pending: int
    num_redelivered: int
    num_waiting: int
    delivered: int
    ack_floor: int
    raw: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_reply(cls, body: Mapping[str, Any]) -> ConsumerInfo:
        return cls(
            stream=str(body.get("stream_name", "")),
            name=str(body.get("name", "")),
            config=body.get("config") or {},
            num_pending=int(body.get("num_pending", 0)),
            num_ack_pending=int(body.get("num_ack_pending", 0)),
            num_redelivered=int(body.get("num_redelivered", 0)),
            num_waiting=int(body.get("num_waiting", 0)),
            delivered=int((body.get("delivered") or {}).get("stream_seq", 0)),
            ack_floor=int((body.get("ack_floor") or {}).get("stream_seq", 0)),
            raw=body,
        )


#: One API call: its subject, its payload, what it is (for errors), and how its answer is read.
Call = tuple[str, bytes, str, "Callable[[dict[str, Any]], Any]"]


def _body(value: Mapping[str, Any] | None) -> bytes:
    return b"" if value is None else json.dumps(value, separators=(",", ":")).encode()


def add_stream_call(config: Mapping[str, Any]) -> Call:
    return f"{API}STREAM.CREATE.{config['name']}", _body(config), "add_stream", StreamInfo.from_reply


def update_stream_call(config: Mapping[str, Any]) -> Call:
    return f"{API}STREAM.UPDATE.{config['name']}", _body(config), "update_stream", StreamInfo.from_reply


def stream_info_call(name: str) -> Call:
    return f"{API}STREAM.INFO.{check_name('stream', name)}", b"", "stream_info", StreamInfo.from_reply


def delete_stream_call(name: str) -> Call:
    return f"{API}STREAM.DELETE.{check_name('stream', name)}", b"", "delete_stream", _success


def stream_for_call(subject: str) -> Call:
    return f"{API}STREAM.NAMES", _body({"subject": validate_filter(subject)}), "find the stream", _streams


def add_consumer_call(stream: str, config: Mapping[str, Any]) -> Call:
    name = config.get("durable_name")
    subject = f"{API}CONSUMER.CREATE.{check_name('stream', stream)}" + (f".{name}" if name else "")
    return subject, _body({"stream_name": stream, "config": config}), "add_consumer", ConsumerInfo.from_reply


def consumer_info_call(stream: str, name: str) -> Call:
    subject = f"{API}CONSUMER.INFO.{check_name('stream', stream)}.{check_name('consumer', name)}"
    return subject, b"", "consumer_info", ConsumerInfo.from_reply


def delete_consumer_call(stream: str, name: str) -> Call:
    subject = f"{API}CONSUMER.DELETE.{check_name('stream', stream)}.{check_name('consumer', name)}"
    return subject, b"", "delete_consumer", _success


def next_subject(stream: str, consumer: str) -> str:
    return f"{API}CONSUMER.MSG.NEXT.{stream}.{consumer}"


def _success(body: dict[str, Any]) -> bool:
    return bool(body.get("success", True))


def _streams(body: dict[str, Any]) -> list[str]:
    return [str(s) for s in body.get("streams") or []]


def merged(current: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A stream's configuration with *update* over it (an update replaces the whole of it)."""
    return {**current, **update}
