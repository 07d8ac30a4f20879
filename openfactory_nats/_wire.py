"""Validation of what callers hand us, and the NATS protocol frames built from it.

Everything here is pure and runs in the caller's thread, so a bad subject, payload,
header or timeout is refused there, before anything is queued.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from ._errors import InvalidMessageError, InvalidTypeError

__all__ = (
    "MAX_SUBJECT_BYTES",
    "SPLIT_PAYLOAD",
    "Frame",
    "WireSubject",
    "build_frame",
    "check_timeout",
    "encode_headers",
    "frame_head",
    "frame_size",
    "split_frame",
    "subject_bytes",
    "validate_subject",
    "wire_subject",
)

#: Longest subject accepted, in UTF-8 bytes. The server's control line is 4 KiB by default,
#: and the PUB line carries the subject plus sizes.
MAX_SUBJECT_BYTES = 4000

# One or more tokens separated by single dots; no whitespace (Unicode included) and no
# control characters (C0, DEL, C1). Empty tokens are rejected because the server drops
# such messages silently.
_SUBJECT_RE = re.compile(r"[^\s.\x00-\x1f\x7f-\x9f]+(?:\.[^\s.\x00-\x1f\x7f-\x9f]+)*")
# RFC 7230 token characters, which the NATS header block also uses for names.
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE_BAD_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

_CACHE_LIMIT = 4096
_subject_cache: dict[str, bytes] = {}


class WireSubject(bytes):
    """A subject validated and encoded once, for one message: published as it is, and
    not cached (each request's reply subject is its own)."""

    __slots__ = ()


def wire_subject(subject: object) -> WireSubject:
    """Validate a subject used once (the reply subject of a request) and encode it,
    without filling the cache of the subjects published to again and again.

    :raises InvalidTypeError, InvalidMessageError: as :func:`validate_subject`.
    """
    return WireSubject(validate_subject(subject).encode("utf-8"))


def validate_subject(subject: object) -> str:
    """Check that *subject* is a subject one can publish to, and return it.

    :raises InvalidTypeError: when *subject* is not a ``str``.
    :raises InvalidMessageError: when it is empty, too long, holds whitespace or control
        characters, has an empty token (``a..b``, ``.a``, ``a.``) or a wildcard token.
    """
    if not isinstance(subject, str):
        raise InvalidTypeError(f"subject must be str, not {type(subject).__name__}")
    if not subject:
        raise InvalidMessageError("subject must not be empty")
    if len(subject) > MAX_SUBJECT_BYTES or len(subject.encode("utf-8", "surrogatepass")) > MAX_SUBJECT_BYTES:
        raise InvalidMessageError(f"subject is longer than {MAX_SUBJECT_BYTES} bytes")
    if _SUBJECT_RE.fullmatch(subject) is None:
        raise InvalidMessageError(f"invalid subject {subject[:80]!r}: empty token, whitespace or control character")
    if ("*" in subject or ">" in subject) and any(t in ("*", ">") for t in subject.split(".")):
        raise InvalidMessageError(f"invalid subject {subject[:80]!r}: wildcards cannot be published to")
    try:
        subject.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessageError(f"invalid subject {subject[:80]!r}: not encodable as UTF-8") from None
    return subject


def subject_bytes(subject: object) -> bytes:
    """Validate *subject* and return it encoded, using a bounded cache of valid subjects."""
    if type(subject) is str:
        cached = _subject_cache.get(subject)
        if cached is not None:
            return cached
    elif type(subject) is WireSubject:
        return subject
    checked = validate_subject(subject)
    encoded = checked.encode("utf-8")
    if type(subject) is str:
        if len(_subject_cache) >= _CACHE_LIMIT:
            _subject_cache.clear()
        _subject_cache[subject] = encoded
    return encoded


def encode_headers(headers: object) -> bytes:
    """Validate a mapping of header names to values and return the NATS header block.

    :raises InvalidTypeError: when *headers* is not a mapping of ``str`` to ``str``.
    :raises InvalidMessageError: when a name is not an RFC 7230 token or a value holds
        CR, LF or another control character.
    """
    if not isinstance(headers, Mapping):
        raise InvalidTypeError(f"headers must be a mapping of str to str, not {type(headers).__name__}")
    parts = [b"NATS/1.0\r\n"]
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidTypeError("header names and values must be str")
        if not _HEADER_NAME_RE.fullmatch(name):
            raise InvalidMessageError(f"invalid header name {name[:80]!r}")
        if _HEADER_VALUE_BAD_RE.search(value):
            raise InvalidMessageError(f"invalid value for header {name!r}: control character")
        parts.append(b"%b: %b\r\n" % (name.encode("ascii"), value.strip().encode("utf-8")))
    parts.append(b"\r\n")
    return b"".join(parts)


def payload_bytes(payload: object) -> bytes:
    """Return *payload* as immutable bytes, copying a bytearray or memoryview.

    :raises InvalidTypeError: for anything that is not bytes-like (``str`` included).
    """
    if type(payload) is bytes:
        return payload
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    raise InvalidTypeError(
        f"payload must be bytes, bytearray or memoryview, not {type(payload).__name__}"
        + ("; encode the str first" if isinstance(payload, str) else "")
    )


def build_frame(subject: object, payload: object, headers: object, max_payload: int) -> bytes:
    """Validate a message and return its complete ``PUB``/``HPUB`` protocol frame.

    :raises InvalidTypeError: for a subject, payload or headers of the wrong type.
    :raises InvalidMessageError: for an invalid subject or headers, or a message larger than
        *max_payload* (headers included, as the server counts them).
    """
    subj = subject_bytes(subject)
    data = payload_bytes(payload)
    if headers is None:
        if len(data) > max_payload:
            raise InvalidMessageError(f"payload of {len(data)} bytes exceeds the server's max_payload of {max_payload}")
        return b"PUB %b %d\r\n%b\r\n" % (subj, len(data), data)
    block = encode_headers(headers)
    total = len(block) + len(data)
    if total > max_payload:
        raise InvalidMessageError(f"message of {total} bytes exceeds the server's max_payload of {max_payload}")
    return b"HPUB %b %d %d\r\n%b%b\r\n" % (subj, len(block), total, block, data)


#: Payloads of at least this many bytes are not copied into their frame: the frame keeps a
#: reference to them instead (see :class:`Frame`).
SPLIT_PAYLOAD = 4096

_CRLF = b"\r\n"


class Frame:
    """A ``PUB``/``HPUB`` frame kept in pieces: its protocol line (with the header block,
    if any), the payload, by reference, and the closing CRLF. Large payloads are never
    copied into a frame: the socket write gathers the pieces (``sendmsg``). The payload is
    immutable ``bytes`` (a ``bytearray`` or ``memoryview`` is copied once, on the way in),
    so what is sent, and replayed, cannot change after ``publish`` returned."""

    __slots__ = ("head", "payload", "size")

    def __init__(self, head: bytes, payload: bytes) -> None:
        self.head = head
        self.payload = payload
        self.size = len(head) + len(payload) + 2

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return self.head + self.payload + _CRLF

    def __repr__(self) -> str:
        return f"<Frame {self.head[:60]!r} +{len(self.payload)} bytes>"


def split_frame(subject: object, payload: bytes, headers: object, max_payload: int) -> Frame:
    """Validate a message as :func:`build_frame` does and return its frame as a
    :class:`Frame` that references *payload* (immutable ``bytes``) instead of copying it."""
    subj = subject_bytes(subject)
    if headers is None:
        if len(payload) > max_payload:
            raise InvalidMessageError(
                f"payload of {len(payload)} bytes exceeds the server's max_payload of {max_payload}"
            )
        return Frame(b"PUB %b %d\r\n" % (subj, len(payload)), payload)
    block = encode_headers(headers)
    total = len(block) + len(payload)
    if total > max_payload:
        raise InvalidMessageError(f"message of {total} bytes exceeds the server's max_payload of {max_payload}")
    return Frame(b"HPUB %b %d %d\r\n%b" % (subj, len(block), total, block), payload)


def frame_head(frame: bytes | Frame) -> bytes:
    """The start of a frame, protocol line included (for reading its subject and reply)."""
    return frame.head if isinstance(frame, Frame) else frame


def frame_size(subject: object, payload: object, headers: object, max_payload: int) -> int:
    """Validate a message as :func:`build_frame` does and return its frame's exact size,
    without building it (for reserving room before copying a large payload)."""
    subj = subject_bytes(subject)
    size = len(payload_bytes(payload)) if not isinstance(payload, bytes) else len(payload)
    if headers is None:
        if size > max_payload:
            raise InvalidMessageError(f"payload of {size} bytes exceeds the server's max_payload of {max_payload}")
        return 4 + len(subj) + 1 + len(str(size)) + 2 + size + 2
    hlen = len(encode_headers(headers))
    total = hlen + size
    if total > max_payload:
        raise InvalidMessageError(f"message of {total} bytes exceeds the server's max_payload of {max_payload}")
    return 5 + len(subj) + 1 + len(str(hlen)) + 1 + len(str(total)) + 2 + total + 2


def check_timeout(value: object, name: str = "timeout") -> float:
    """Return *value* as a finite, non-negative float.

    :raises InvalidTypeError: when it is not a real number (``bool`` included).
    :raises InvalidMessageError: when it is negative, NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    result = float(value)
    if math.isnan(result) or math.isinf(result) or result < 0:
        raise InvalidMessageError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
    return result
