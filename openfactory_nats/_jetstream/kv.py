"""The key-value store on JetStream, without I/O: names, bucket configuration, entries,
and the ordered consumer a watch reads.

A bucket ``B`` is the stream ``KV_B`` storing ``$KV.B.>``, one subject per key, keeping
``history`` messages per subject. A put is a JetStream publish to ``$KV.B.<key>``; its
stream sequence is the key's revision. A delete is a message with the header
``KV-Operation: DEL``; a purge one with ``KV-Operation: PURGE`` and ``Nats-Rollup: sub``
(which drops the key's earlier revisions). ``Nats-Expected-Last-Subject-Sequence`` makes
create (0) and update conditional: the server refuses with err_code 10071 when the key
moved on.

A watch is an *ordered consumer*: an ephemeral push consumer without acks, delivering to
an inbox of ours, with flow control and idle heartbeats. :class:`WatchState` checks each
delivery: a consumer sequence that is not the previous one plus one, a heartbeat naming
another last sequence, or a reconnection mean something was lost, and the consumer is made
again from the last stream sequence delivered plus one, so no revision is missed or
repeated.
"""

from __future__ import annotations

import base64
import datetime
import enum
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import (
    BucketNotFoundError,
    InvalidMessageError,
    InvalidTypeError,
    JetStreamError,
    KeyExistsError,
    KeyNotFoundError,
    RevisionMismatchError,
    StreamNotFoundError,
)
from .._message import Msg
from . import api

__all__ = (
    "DEL",
    "PURGE",
    "PUT",
    "Entry",
    "Step",
    "WatchState",
    "bucket_config",
    "check_bucket",
    "check_key",
    "check_value",
    "entry_from_direct",
    "entry_from_get",
    "read_pub_ack",
)

PUT, DEL, PURGE = "PUT", "DEL", "PURGE"
OP_HEADER = "KV-Operation"
ROLLUP_HEADER = "Nats-Rollup"
EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
MSG_ID = "Nats-Msg-Id"
WRONG_LAST_SEQUENCE = (10071, 10164)
_MARKER_REASON = "Nats-Marker-Reason"  # nats-server 2.11+: markers the server places itself
_BUCKET_RE = re.compile(r"[a-zA-Z0-9_-]+")
_KEY_RE = re.compile(r"[-/_=.a-zA-Z0-9]+")
_FILTER_RE = re.compile(r"[-/_=.a-zA-Z0-9*>]+")
_NS = 1_000_000_000
#: Idle heartbeat asked of a watch's consumer; three missed mean it is gone.
HEARTBEAT = 5.0


def check_bucket(bucket: object) -> str:
    """A bucket name: ``[A-Za-z0-9_-]+``."""
    if not isinstance(bucket, str):
        raise InvalidTypeError(f"bucket must be str, not {type(bucket).__name__}")
    if not _BUCKET_RE.fullmatch(bucket) or len(bucket) > 200:
        raise InvalidMessageError(f"invalid bucket name {bucket[:80]!r}: use letters, digits, '-' and '_'")
    return bucket


def check_key(key: object, *, wildcards: bool = False) -> str:
    """A key: ``[-/_=.A-Za-z0-9]+``, no leading or trailing dot, no empty token; with
    *wildcards* (a watch or keys filter) also ``*`` and ``>`` as whole tokens."""
    if not isinstance(key, str):
        raise InvalidTypeError(f"key must be str, not {type(key).__name__}")
    pattern = _FILTER_RE if wildcards else _KEY_RE
    bad = not pattern.fullmatch(key) or key.startswith(".") or key.endswith(".") or ".." in key
    if not bad and wildcards:
        tokens = key.split(".")
        bad = any(("*" in t or ">" in t) and t not in ("*", ">") for t in tokens) or ">" in tokens[:-1]
    if bad or len(key) > 3000:
        what = "key filter" if wildcards else "key"
        raise InvalidMessageError(
            f"invalid {what} {key[:80]!r}: use letters, digits and '-/_=.', no leading, trailing or double dot"
            + (", wildcards only as whole tokens" if wildcards else ", no wildcards")
        )
    return key


def check_value(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise InvalidTypeError(f"value must be bytes-like, not {type(value).__name__}")


def check_revision(last: object) -> int:
    if not isinstance(last, int) or isinstance(last, bool):
        raise InvalidTypeError(f"last must be an int revision, not {type(last).__name__}")
    if last < 0:
        raise InvalidMessageError(f"last must be a revision >= 0, not {last}")
    return last


def stream_name(bucket: str) -> str:
    return f"KV_{bucket}"


def prefix(bucket: str) -> str:
    return f"$KV.{bucket}."


def bucket_config(
    bucket: str, history: int, ttl: float | None, storage: str, options: Mapping[str, Any]
) -> dict[str, Any]:
    """The stream configuration of a bucket (as nats-py's and Go's ``create_key_value``).

    :param options: ``max_value_size``, ``max_bytes``, ``replicas``, ``description``.
    """
    check_bucket(bucket)
    if not isinstance(history, int) or isinstance(history, bool):
        raise InvalidTypeError(f"history must be int, not {type(history).__name__}")
    if not 1 <= history <= 64:
        raise InvalidMessageError(f"history must be between 1 and 64, not {history}")
    unknown = set(options) - {"max_value_size", "max_bytes", "replicas", "description"}
    if unknown:
        raise InvalidMessageError(f"unknown bucket option(s): {', '.join(sorted(unknown))}")
    window = 120.0
    extra: dict[str, Any] = {
        "description": options.get("description"),
        "max_msg_size": options.get("max_value_size", -1),
        "max_bytes": options.get("max_bytes", -1),
        "num_replicas": options.get("replicas", 1),
    }
    if extra["description"] is None:
        del extra["description"]
    if ttl is not None:
        api.stream_config("x", None, None, {"max_age": ttl})  # validates it
        if ttl > 0:
            window = min(window, float(ttl))
        extra["max_age"] = ttl
    return api.stream_config(
        stream_name(bucket),
        [f"$KV.{bucket}.>"],
        storage,
        {
            **extra,
            "max_msgs_per_subject": history,
            "max_msgs": -1,
            "max_consumers": -1,
            "allow_rollup_hdrs": True,
            "deny_delete": True,
            "discard": "new",
            "allow_direct": True,
            "duplicate_window": window,
        },
    )


@dataclass(frozen=True)
class Entry:
    """One revision of a key.

    :ivar operation: ``"PUT"``, or ``"DEL"``/``"PURGE"`` for a delete or purge marker
        (whose value is empty).
    :ivar created: when the stream stored it (UTC).
    :ivar delta: (watches) the revisions still to come before the watch is caught up.
    """

    bucket: str
    key: str
    value: bytes
    revision: int
    operation: str
    created: datetime.datetime
    delta: int = 0


def _operation(headers: Mapping[str, str] | None) -> str:
    if not headers:
        return PUT
    op = headers.get(OP_HEADER)
    if op in (DEL, PURGE):
        return op
    reason = headers.get(_MARKER_REASON)
    if reason in ("MaxAge", "Purge"):
        return PURGE
    if reason == "Remove":
        return DEL
    return PUT


def parse_time(text: str) -> datetime.datetime:
    """An RFC 3339 time with up to nanoseconds (``2024-05-01T10:00:00.123456789Z``)."""
    text = text.strip()
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if match is None:
        raise InvalidMessageError(f"unreadable time {text[:40]!r}")
    base, fraction, zone = match.groups()
    micro = (fraction or "0")[:6].ljust(6, "0")
    stamp = datetime.datetime.fromisoformat(f"{base}.{micro}{'+00:00' if zone == 'Z' else zone}")
    return stamp.astimezone(datetime.UTC)


def entry_from_direct(bucket: str, key: str, reply: Msg, cluster: str) -> Entry:
    """The entry in the answer of a direct get (``$JS.API.DIRECT.GET.KV_B.$KV.B.<key>``).

    :raises KeyNotFoundError: for no such key, or a delete/purge marker as its last revision.
    """
    headers = reply.headers or {}
    status = headers.get("Status")
    if status == "404":
        raise KeyNotFoundError(f"{bucket}: no key {key!r}", cluster=cluster, bucket=bucket, key=key)
    if status is not None or "Nats-Sequence" not in headers:
        raise JetStreamError(
            f"cluster {cluster!r}: get {key!r}: {status} {headers.get('Description', '')}".rstrip(),
            cluster=cluster,
            code=int(status) if status and status.isdigit() else 0,
        )
    entry = Entry(
        bucket,
        key,
        reply.data,
        int(headers["Nats-Sequence"]),
        _operation(headers),
        parse_time(headers["Nats-Time-Stamp"]),
    )
    return _live(entry, cluster)


def entry_from_get(bucket: str, key: str, data: bytes, cluster: str) -> Entry:
    """The entry in the answer of ``STREAM.MSG.GET`` (``{"message": {...}}``, base64 fields).

    :raises KeyNotFoundError: as :func:`entry_from_direct`; also when the revision asked
        for is another key's.
    :raises BucketNotFoundError: when the bucket's stream is gone.
    """
    try:
        body = api.parse_reply(data, cluster, f"get {key!r}")
    except StreamNotFoundError as exc:
        raise not_found(bucket, cluster, exc) from None
    except JetStreamError as exc:
        if exc.code != 404:
            raise
        raise KeyNotFoundError(f"{bucket}: no key {key!r}", cluster=cluster, bucket=bucket, key=key) from None
    message = body.get("message") or {}
    if message.get("subject") != prefix(bucket) + key:
        raise KeyNotFoundError(f"{bucket}: no key {key!r} at that revision", cluster=cluster, bucket=bucket, key=key)
    headers: dict[str, str] = {}
    raw = base64.b64decode(message.get("hdrs") or b"")
    for line in raw.decode("utf-8", "replace").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip()] = value.strip()
    entry = Entry(
        bucket,
        key,
        base64.b64decode(message.get("data") or b""),
        int(message.get("seq", 0)),
        _operation(headers),
        parse_time(str(message.get("time", "1970-01-01T00:00:00Z"))),
    )
    return _live(entry, cluster)


def _live(entry: Entry, cluster: str) -> Entry:
    if entry.operation != PUT:
        raise KeyNotFoundError(
            f"{entry.bucket}: key {entry.key!r} was {'deleted' if entry.operation == DEL else 'purged'}"
            f" (revision {entry.revision})",
            cluster=cluster,
            bucket=entry.bucket,
            key=entry.key,
            revision=entry.revision,
            operation=entry.operation,
        )
    return entry


def not_found(bucket: str, cluster: str, exc: JetStreamError | None = None) -> BucketNotFoundError:
    return BucketNotFoundError(
        f"cluster {cluster!r}: no key-value bucket {bucket!r}",
        cluster=cluster,
        code=404 if exc is None else exc.code,
        err_code=api.STREAM_NOT_FOUND if exc is None else exc.err_code,
        bucket=bucket,
    )


def read_pub_ack(data: bytes, bucket: str, key: str, last: int | None, cluster: str) -> int:
    """The revision in a JetStream publish's acknowledgement.

    :raises KeyExistsError: for a create (*last* 0) of a key that has a value.
    :raises RevisionMismatchError: for an update whose *last* is not the key's revision.
    :raises BucketNotFoundError: when the bucket's stream is gone.
    """
    try:
        body = api.parse_reply(data, cluster, f"put {key!r}")
    except StreamNotFoundError as exc:
        raise not_found(bucket, cluster, exc) from None
    except JetStreamError as exc:
        if exc.err_code not in WRONG_LAST_SEQUENCE:
            raise
        kind = KeyExistsError if last == 0 else RevisionMismatchError
        what = "has a value" if last == 0 else f"is not at revision {last}"
        raise kind(
            f"{bucket}: key {key!r} {what} ({exc.description})",
            cluster=cluster,
            code=exc.code,
            err_code=exc.err_code,
            description=exc.description,
            bucket=bucket,
            key=key,
            last=last if last is not None else 0,
        ) from None
    seq = body.get("seq")
    if not isinstance(seq, int):
        raise JetStreamError(f"cluster {cluster!r}: put {key!r}: unexpected acknowledgement", cluster=cluster)
    return seq


class Step(enum.Enum):
    """What a watch does with a message :meth:`WatchState.read` looked at."""

    IGNORE = "ignore"  # not ours (an earlier consumer's)
    ALIVE = "alive"  # a heartbeat: nothing was lost
    FLOW = "flow"  # answer the flow-control request: an empty message to the value
    DELIVER = "deliver"  # the value is an Entry (or None: skipped, e.g. ignore_deletes)
    RESET = "reset"  # something was lost: make the consumer again


@dataclass
class WatchState:
    """The ordered consumer of one watch: its configuration and what it delivered.

    :ivar last: the stream sequence (revision) last delivered; the next consumer starts
        after it.
    :ivar caught_up: the current values (or history) have all been delivered.
    """

    bucket: str
    keys: str
    include_history: bool = False
    ignore_deletes: bool = False
    updates_only: bool = False
    headers_only: bool = False
    last: int = 0
    caught_up: bool = False
    inbox: str = ""
    consumer: str = ""
    delivered: int = 0  # consumer sequence of the current consumer's last message
    generation: int = 0
    _base: str = ""

    def __post_init__(self) -> None:
        check_bucket(self.bucket)
        check_key(self.keys, wildcards=True)
        self._base = f"_INBOX.{secrets.token_hex(11)}"

    @property
    def stream(self) -> str:
        return stream_name(self.bucket)

    def next_consumer(self) -> tuple[str, bytes]:
        """The request that makes the next consumer (subject, payload). It delivers to a
        new inbox (:attr:`inbox`, to subscribe to first: the server sees no interest in
        a wildcard subscription), so what an earlier consumer still sends is told apart."""
        self.generation += 1
        self.inbox = f"{self._base}.{self.generation}"
        self.consumer = f"{self._base[7:]}_{self.generation}"
        self.delivered = 0
        config: dict[str, Any] = {
            "name": self.consumer,
            "deliver_subject": self.inbox,
            "ack_policy": "none",
            "max_deliver": 1,
            "filter_subject": prefix(self.bucket) + self.keys,
            "flow_control": True,
            "idle_heartbeat": int(HEARTBEAT * _NS),
            "replay_policy": "instant",
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": 300 * _NS,
        }
        if self.headers_only:
            config["headers_only"] = True
        # updates_only: after the first consumer, resume after the stream's last sequence
        # it started from (see created()), not at "new" (what came in between is missed).
        resume = self.last > 0 or (self.updates_only and self.generation > 1)
        if resume and (self.caught_up or self.include_history):
            config["deliver_policy"] = "by_start_sequence"
            config["opt_start_seq"] = self.last + 1
        elif self.updates_only:
            config["deliver_policy"] = "new"
        else:  # catching up again: the current values, those delivered already skipped
            config["deliver_policy"] = "all" if self.include_history else "last_per_subject"
        stream = stream_name(self.bucket)
        body = {"stream_name": stream, "config": config}
        return f"{api.API}CONSUMER.CREATE.{stream}.{self.consumer}", json.dumps(body, separators=(",", ":")).encode()

    def created(self, body: Mapping[str, Any]) -> bool:
        """The consumer was made (its API answer); returns True when that makes the watch
        caught up (nothing to deliver first)."""
        if self.updates_only and self.last == 0:
            delivered = body.get("delivered")
            if isinstance(delivered, Mapping) and isinstance(delivered.get("stream_seq"), int):
                self.last = delivered["stream_seq"]
        if not self.caught_up and (self.updates_only or int(body.get("num_pending", 0)) == 0):
            self.caught_up = True
            return True
        return False

    def read(self, msg: Msg) -> tuple[Step, Any]:
        """Look at one message of the watch's subscription: (:class:`Step`, value).

        Stored messages come with their own subject (``$KV.B.<key>``) and the consumer's
        name in their ack subject; heartbeats and flow-control requests come on the
        consumer's inbox: both tell an earlier consumer's apart."""
        headers = msg.headers
        status = headers.get("Status") if headers is not None else None
        if status is not None:
            assert headers is not None
            if msg.subject != self.inbox:
                return Step.IGNORE, None
            if status != "100":  # 409 consumer deleted, ...
                return Step.RESET, None
            if msg.reply:  # a flow-control request
                return Step.FLOW, msg.reply
            stalled = headers.get("Nats-Consumer-Stalled")
            if stalled:
                return Step.FLOW, stalled
            last = headers.get("Nats-Last-Consumer")
            if last is not None and last.isdigit() and int(last) != self.delivered:
                return Step.RESET, None
            return Step.ALIVE, None
        ack = _ack_fields(msg.reply)
        if ack is None or ack[0] != self.consumer:
            return Step.IGNORE, None
        _, seq, consumer_seq, stamp, pending = ack
        if consumer_seq != self.delivered + 1:
            return Step.RESET, None
        self.delivered = consumer_seq
        if not self.caught_up and pending == 0:
            self.caught_up = True
        if seq <= self.last:  # delivered already, by an earlier consumer
            return Step.DELIVER, None
        self.last = seq
        op = _operation(headers)
        if self.ignore_deletes and op != PUT:
            return Step.DELIVER, None
        key = msg.subject[len(self.bucket) + 5 :]  # after "$KV.<bucket>."
        created = datetime.datetime.fromtimestamp(stamp / 1e9, tz=datetime.UTC)
        return Step.DELIVER, Entry(self.bucket, key, msg.data, seq, op, created, pending)


def _ack_fields(reply: str | None) -> tuple[str, int, int, int, int] | None:
    """(consumer, stream sequence, consumer sequence, timestamp in ns, pending) of a
    ``$JS.ACK`` subject (v1, or v2 with domain and account), None when it is not one:
    what :func:`.msg.parse_metadata` reads, without the objects it makes (once per
    message of a watch)."""
    if not reply:
        return None
    tokens = reply.split(".")
    if len(tokens) == 9:
        at = 2  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>
    elif len(tokens) >= 11:
        at = 4  # $JS.ACK.<domain>.<account hash>.<stream>...
    else:
        return None
    if tokens[0] != "$JS" or tokens[1] != "ACK":
        return None
    try:
        int(tokens[at + 2])  # the delivery count, unused: read for the check
        return tokens[at + 1], int(tokens[at + 3]), int(tokens[at + 4]), int(tokens[at + 5]), int(tokens[at + 6])
    except ValueError:
        return None
