"""Conditional writes to the key-value store, without I/O: the message id that tells our
own write sent twice (after a lost connection) from another writer's, and the conflict
a create reports."""

from __future__ import annotations

import base64
import json
import secrets

from .._errors import KeyExistsError, RevisionMismatchError
from . import api
from .kv import EXPECTED_LAST, MSG_ID, prefix, stream_name

__all__ = ("key_exists", "last_query", "write_headers", "written_by")


def write_headers(headers: dict[str, str] | None, last: int | None) -> dict[str, str] | None:
    """The headers of a write; a conditional one (*last*) also gets a message id: the
    request path sends an unconfirmed message again after a lost connection, and the
    server answers that one with a conflict (it checks the expected revision before
    duplicates); :func:`written_by` then tells whether the first one went through."""
    if last is None:
        return headers
    return {**(headers or {}), EXPECTED_LAST: str(last), MSG_ID: secrets.token_hex(12)}


def last_query(bucket: str, key: str) -> tuple[str, bytes]:
    """The request for the latest message of *key* with its headers (``STREAM.MSG.GET``)."""
    return f"{api.API}STREAM.MSG.GET.{stream_name(bucket)}", json.dumps({"last_by_subj": prefix(bucket) + key}).encode()


def written_by(data: bytes, msg_id: str) -> int | None:
    """The revision in a ``STREAM.MSG.GET`` answer when its message has the id *msg_id*
    (our own conditional write, sent twice), else None."""
    try:
        message = json.loads(data).get("message") or {}
        raw = base64.b64decode(message.get("hdrs") or b"").decode("utf-8", "replace")
    except (ValueError, AttributeError):
        return None
    for line in raw.split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip() == MSG_ID and value.strip() == msg_id:
            seq = message.get("seq")
            return seq if isinstance(seq, int) else None
    return None


def key_exists(exc: RevisionMismatchError) -> KeyExistsError:
    """A create's conflict: its write over a delete or purge marker lost to another writer."""
    return KeyExistsError(
        f"{exc.bucket}: key {exc.key!r} has a value ({exc.description})",
        cluster=exc.cluster,
        code=exc.code,
        err_code=exc.err_code,
        description=exc.description,
        bucket=exc.bucket,
        key=exc.key,
        last=exc.last,
    )
