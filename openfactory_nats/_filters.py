"""Validation of what one subscribes with (subject filters, queue groups), and matching.

A *filter* is a subject that may hold wildcards: ``*`` stands for exactly one token and
``>`` for one or more trailing tokens. The rules are stricter than nats-server's where the
server would accept a subscription that can never do what was meant: ``a..b`` or ``a*``
(a literal ``*`` inside a token) subscribe without error and then silently match nothing
anyone publishes to on purpose.

Queue group names are checked against what nats-server 2.15 actually does: it takes the
name as one opaque token of the ``SUB`` line, so dots, ``*``, ``>`` and any non-ASCII
character are fine (they were checked against a live server: ``SUB foo a.* 1`` gets
``+OK`` and receives). Whitespace would split the protocol line, and CR/LF would inject
protocol, so they are refused; so are other control characters, which only ever come
from a bug.
"""

from __future__ import annotations

import re

from ._errors import InvalidMessageError, InvalidTypeError

__all__ = (
    "MAX_CONTROL_LINE",
    "MAX_FILTER_BYTES",
    "MAX_QUEUE_BYTES",
    "check_sub_line",
    "subject_matches",
    "validate_filter",
    "validate_queue",
)

#: Longest filter accepted, in UTF-8 bytes (the server's control line is 4 KiB by default).
MAX_FILTER_BYTES = 4000
#: Longest queue group name accepted, in UTF-8 bytes.
MAX_QUEUE_BYTES = 4000
#: nats-server's ``max_control_line`` by default, in bytes. Its INFO does not announce it,
#: so a server configured lower is not known to the client.
MAX_CONTROL_LINE = 4096
#: Room kept on a ``SUB`` line for the subscription id nats-py numbers it with.
_SID_DIGITS = 20

# Whitespace (Unicode included: ``\s`` on str) and control characters (C0, DEL, C1).
_BAD_CHAR = r"\s\x00-\x1f\x7f-\x9f"
_FILTER_RE = re.compile(rf"[^{_BAD_CHAR}.]+(?:\.[^{_BAD_CHAR}.]+)*")
_QUEUE_RE = re.compile(rf"[^{_BAD_CHAR}]+")
_SPACE_RE = re.compile(r"\s")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _utf8_length(value: str, what: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidMessageError(f"invalid {what} {value[:80]!r}: not encodable as UTF-8") from None


def _bad_characters(value: str, what: str) -> InvalidMessageError:
    """The error for a value that failed its pattern because of a character in it."""
    control = _CONTROL_RE.search(value)
    # Control characters first: \t, \n and \r are both, and "control character" says more.
    if control is not None:
        return InvalidMessageError(f"invalid {what} {value[:80]!r}: control character {control.group()!r}")
    space = _SPACE_RE.search(value)
    char = space.group() if space is not None else "?"
    return InvalidMessageError(f"invalid {what} {value[:80]!r}: whitespace {char!r}")


def validate_filter(subject: object) -> str:
    """Check that *subject* is a subject one can subscribe to, and return it.

    Tokens are separated by single dots; ``*`` may stand only as a whole token, ``>`` only
    as the whole last token.

    :raises InvalidTypeError: when *subject* is not a ``str``.
    :raises InvalidMessageError: when it is empty, longer than :data:`MAX_FILTER_BYTES`
        UTF-8 bytes, not encodable as UTF-8, has an empty token (``a..b``, ``.a``,
        ``a.``), holds whitespace or a control character, or misplaces a wildcard.
    """
    if not isinstance(subject, str):
        raise InvalidTypeError(f"subject must be str, not {type(subject).__name__}")
    if not subject:
        raise InvalidMessageError("subject must not be empty")
    if len(subject) > MAX_FILTER_BYTES or _utf8_length(subject, "subject") > MAX_FILTER_BYTES:
        raise InvalidMessageError(f"subject is longer than {MAX_FILTER_BYTES} bytes")
    if _FILTER_RE.fullmatch(subject) is None:
        if "" in subject.split("."):
            raise InvalidMessageError(f"invalid subject {subject[:80]!r}: empty token")
        raise _bad_characters(subject, "subject")
    if "*" in subject or ">" in subject:
        tokens = subject.split(".")
        last = len(tokens) - 1
        for index, token in enumerate(tokens):
            if "*" in token and token != "*":
                raise InvalidMessageError(f"invalid subject {subject[:80]!r}: '*' must be a whole token")
            if ">" in token and (token != ">" or index != last):
                raise InvalidMessageError(f"invalid subject {subject[:80]!r}: '>' must be the whole last token")
    return subject


def validate_queue(queue: object) -> str | None:
    """Check a queue group name and return it; ``None`` (no queue group) is returned as is.

    :raises InvalidTypeError: when *queue* is neither ``None`` nor a ``str``.
    :raises InvalidMessageError: when it is empty, longer than :data:`MAX_QUEUE_BYTES`
        UTF-8 bytes, not encodable as UTF-8, or holds whitespace or a control character.
    """
    if queue is None:
        return None
    if not isinstance(queue, str):
        raise InvalidTypeError(f"queue must be str or None, not {type(queue).__name__}")
    if not queue:
        raise InvalidMessageError("queue must not be empty; pass None for no queue group")
    if len(queue) > MAX_QUEUE_BYTES or _utf8_length(queue, "queue") > MAX_QUEUE_BYTES:
        raise InvalidMessageError(f"queue is longer than {MAX_QUEUE_BYTES} bytes")
    if _QUEUE_RE.fullmatch(queue) is None:
        raise _bad_characters(queue, "queue")
    return queue


def check_sub_line(subject: str, queue: str | None) -> None:
    """Check that the ``SUB <subject> [queue] <sid>`` line of a subscription fits in the
    server's control line, as each part alone may and both together may not: the server
    would close the connection, and nats-py send the line again on every reconnection.

    :param subject: a filter that passed :func:`validate_filter`.
    :param queue: a queue group that passed :func:`validate_queue`, or None.
    :raises InvalidMessageError: when the line would be longer than :data:`MAX_CONTROL_LINE`.
    """
    size = len(b"SUB ") + len(subject.encode("utf-8")) + 1 + _SID_DIGITS + len(b"\r\n")
    if queue is not None:
        size += len(queue.encode("utf-8")) + 1
    if size > MAX_CONTROL_LINE:
        raise InvalidMessageError(
            f"subject and queue group together are too long: their SUB line would take {size} bytes, "
            f"more than the server's control line ({MAX_CONTROL_LINE} bytes)"
        )


def subject_matches(subject_filter: str, subject: str) -> bool:
    """True when a message published to *subject* is delivered to a subscription on
    *subject_filter*, under NATS wildcard rules.

    Both are taken as valid (see :func:`validate_filter`); a wildcard in *subject* is
    matched literally, as the server never delivers to a wildcard subject anyway.
    """
    if "*" not in subject_filter and ">" not in subject_filter:
        return subject_filter == subject
    tokens = subject.split(".")
    patterns = subject_filter.split(".")
    count = len(tokens)
    for index, pattern in enumerate(patterns):
        if pattern == ">":
            return count > index
        if index >= count:
            return False
        if pattern != "*" and pattern != tokens[index]:
            return False
    return count == len(patterns)
