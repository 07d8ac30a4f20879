"""Keep credentials out of logs, exception messages and reprs."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ("redact", "redact_url")

# scheme://user:password@ or scheme://token@ anywhere in a text
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^@/\s'\"]*)@")


def _mask(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    user, sep, _secret = userinfo.partition(":")
    masked = f"{user}:***" if sep else "***"
    return f"{match.group('scheme')}{masked}@"


def redact(text: str) -> str:
    """Mask the credentials of every URL found in *text*.

    ``nats://alice:secret@host:4222`` becomes ``nats://alice:***@host:4222`` and
    ``nats://token@host`` becomes ``nats://***@host``.
    """
    if "@" not in text:
        return text
    return _USERINFO_RE.sub(_mask, text)


def redact_url(url: str) -> str:
    """Return *url* with its password or token masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***" if parts.password is not None else "***"
    return urlunsplit((parts.scheme, f"{user}@{host}", parts.path, parts.query, parts.fragment))
