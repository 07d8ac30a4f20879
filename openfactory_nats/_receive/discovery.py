"""The NATS services protocol (ADR-32, "micro"): its names, subjects and responses, and
:func:`discover`, the blocking discovery client.

A service instance answers ``$SRV.<VERB>``, ``$SRV.<VERB>.<name>`` and
``$SRV.<VERB>.<name>.<id>`` for the verbs PING, INFO and STATS (nine subjects, no queue
group: every instance answers). Discovery is one request with many replies: the client
subscribes to a fresh inbox, publishes the three verbs with replies to it, and gathers
what comes for a while; replies are grouped by instance id. It reads what any client's
services answer (nats.go, nats-py's ``nats.micro``, this library).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from .._errors import ClusterTimeoutError, InvalidMessageError, InvalidTypeError
from .._message import Msg
from .._wire import check_timeout
from .subscription import Subscription

__all__ = (
    "INFO_TYPE",
    "PING_TYPE",
    "STATS_TYPE",
    "VERBS",
    "ServiceInstance",
    "check_metadata",
    "check_name",
    "check_version",
    "control_subjects",
    "discover",
    "new_id",
    "rfc3339",
)

PREFIX = "$SRV"
VERBS = ("PING", "INFO", "STATS")
PING_TYPE = "io.nats.micro.v1.ping_response"
INFO_TYPE = "io.nats.micro.v1.info_response"
STATS_TYPE = "io.nats.micro.v1.stats_response"

_NAME = re.compile(r"[A-Za-z0-9_-]+")
# The semantic version's own regular expression (semver.org), as ADR-32 asks.
_SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?",
    re.ASCII,  # \d is 0-9 only, as in every other client's check
)
_ID_ALPHABET = string.ascii_letters + string.digits


def check_name(what: str, value: object) -> str:
    """A service or endpoint name: ``[A-Za-z0-9_-]+``.

    :raises InvalidTypeError: for a non-str.
    :raises InvalidMessageError: for anything else the ADR does not allow.
    """
    if not isinstance(value, str):
        raise InvalidTypeError(f"{what} must be a str, not {type(value).__name__}")
    if not _NAME.fullmatch(value):
        raise InvalidMessageError(f"{what} {value[:80]!r} is not valid: only A-Z, a-z, 0-9, '_' and '-'")
    return value


def check_version(value: object) -> str:
    """A semantic version (``1.0.0``, ``2.1.0-rc.1+build.5``).

    :raises InvalidTypeError: for a non-str.
    :raises InvalidMessageError: for a string that is not a semantic version.
    """
    if not isinstance(value, str):
        raise InvalidTypeError(f"version must be a str, not {type(value).__name__}")
    if not _SEMVER.fullmatch(value):
        raise InvalidMessageError(f"version {value[:80]!r} is not a semantic version (such as '1.0.0')")
    return value


def check_metadata(value: object) -> dict[str, str]:
    """Metadata: a mapping of str to str (None for none), copied.

    :raises InvalidTypeError: for anything else.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidTypeError("metadata must be a mapping of str to str")
    return dict(value)


def new_id() -> str:
    """A service instance id: 22 random letters and digits, as a NUID is."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(22))


def control_subjects(name: str, instance: str) -> list[tuple[str, str]]:
    """The nine ``(verb, subject)`` an instance answers."""
    return [
        (verb, subject)
        for verb in VERBS
        for subject in (f"{PREFIX}.{verb}", f"{PREFIX}.{verb}.{name}", f"{PREFIX}.{verb}.{name}.{instance}")
    ]


def rfc3339(timestamp: float) -> str:
    """*timestamp* (seconds since the epoch) in RFC 3339, UTC, with microseconds (what both
    Go's ``time.Parse`` and nats-py's ``%Y-%m-%dT%H:%M:%S.%fZ`` read)."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ServiceInstance:
    """One running instance of a service, as :meth:`SyncNatsCluster.discover` found it.

    :ivar ping: its PING response (a dict, as the ADR has it), or None if it did not answer;
        likewise :attr:`info` and :attr:`stats`.
    """

    id: str
    name: str
    version: str
    # Hashed by identity only: the responses are dicts.
    ping: dict[str, Any] | None = field(default=None, hash=False)
    info: dict[str, Any] | None = field(default=None, hash=False)
    stats: dict[str, Any] | None = field(default=None, hash=False)
    metadata: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def description(self) -> str:
        """The service's description (from INFO; empty if none)."""
        return str((self.info or {}).get("description") or "")

    @property
    def started(self) -> str | None:
        """When the instance started (RFC 3339, from STATS)."""
        started = (self.stats or {}).get("started")
        return None if started is None else str(started)

    @property
    def endpoints(self) -> list[dict[str, Any]]:
        """Its endpoints: INFO's (``name``, ``subject``, ``queue_group``, ``metadata``)
        with STATS' counters (``num_requests``, ``num_errors``, ``last_error``,
        ``processing_time``, ``average_processing_time``) where it answered both."""
        infos = _dicts((self.info or {}).get("endpoints"))
        stats = _dicts((self.stats or {}).get("endpoints"))
        if not infos:
            return [dict(s) for s in stats]
        merged = [dict(e) for e in infos]
        unmatched = list(stats)
        for endpoint in merged:
            for s in unmatched:
                if s.get("name") == endpoint.get("name") and s.get("subject") == endpoint.get("subject"):
                    endpoint.update({k: v for k, v in s.items() if k not in endpoint})
                    unmatched.remove(s)
                    break
        return merged

    def as_dict(self) -> dict[str, Any]:
        """What ``openfactory-nats services --json`` prints for it."""
        return {
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "description": self.description,
            "metadata": dict(self.metadata),
            "started": self.started,
            "endpoints": self.endpoints,
        }


def _dicts(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


class Host(Protocol):
    """The blocking cluster discovery runs on (:class:`~openfactory_nats.SyncNatsCluster`)."""

    @property
    def name(self) -> str: ...

    def subscribe(self, subject: str, *, timeout: float | None = None) -> Subscription: ...

    def _send_to(self, subject: str, reply: str, payload: bytes, timeout: float | None) -> None: ...


def discover(host: Host, name: str | None, timeout: float, logger: logging.Logger) -> list[ServiceInstance]:
    """Every instance of service *name* (all services when None) that answered within
    *timeout* s: see :meth:`SyncNatsCluster.discover`."""
    if name is not None:
        check_name("service name", name)
    wait = check_timeout(timeout)
    inbox = f"_INBOX.{secrets.token_hex(11)}"
    found: dict[str, dict[str, dict[str, Any]]] = {}
    unreadable = 0
    # Subscribing and sending get *timeout* too, not the cluster's default: a stalled
    # server would otherwise hold the call for that long.
    started = time.monotonic()
    sub = host.subscribe(f"{inbox}.*", timeout=wait)
    try:
        for verb in VERBS:
            left = max(0.0, started + wait - time.monotonic())
            host._send_to(
                f"{PREFIX}.{verb}" if name is None else f"{PREFIX}.{verb}.{name}", f"{inbox}.{verb}", b"", left
            )
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = sub.next_msg(left)
            except ClusterTimeoutError:
                break
            if msg.headers and "Status" in msg.headers:
                continue  # the server's "no responders" when no service answers a verb
            response = _response(msg)
            if response is None:
                unreadable += 1
                continue
            found.setdefault(response["id"], {})[msg.subject.rsplit(".", 1)[1]] = response
    finally:
        sub.unsubscribe(wait)
    if unreadable:
        logger.warning("cluster %s: discovery: %d reply(ies) were not ADR-32 responses; ignored", host.name, unreadable)
    return sorted((_instance(key, got) for key, got in found.items()), key=lambda i: (i.name, i.version, i.id))


def _response(msg: Msg) -> dict[str, Any] | None:
    try:
        response = json.loads(msg.data)
    except (ValueError, RecursionError):  # RecursionError: too deeply nested
        return None
    if not isinstance(response, dict) or not isinstance(response.get("id"), str):
        return None
    return response


def _instance(key: str, got: dict[str, dict[str, Any]]) -> ServiceInstance:
    first = got.get("INFO") or got.get("STATS") or got.get("PING") or {}
    metadata = first.get("metadata")
    return ServiceInstance(
        id=key,
        name=str(first.get("name", "")),
        version=str(first.get("version", "")),
        ping=got.get("PING"),
        info=got.get("INFO"),
        stats=got.get("STATS"),
        metadata={str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {},
    )
