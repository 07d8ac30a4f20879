"""The received message, as user code sees it.

A :class:`Msg` is built on the event-loop thread for every message that arrives, at up to a
few hundred thousand a second, so its constructor is kept to plain slot assignments
(a frozen dataclass costs four times as much, every field going through
``object.__setattr__``, and so does a ``__setattr__`` that refuses writes). The public
attributes are read-only properties over private slots: assigning or deleting one raises
``AttributeError``, and there is no ``__dict__`` to add attributes to. The private slots
are the library's business.

Replying goes through a *responder*, a callable the cluster gives each message it
delivers (``responder(reply_subject, data, headers)``, i.e. a publish). A message built
without one (in a test, say) cannot be responded to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from ._errors import ClusterUnavailableError, InvalidMessageError

__all__ = ("Msg", "Responder")

#: ``responder(subject, data, headers)`` publishes a reply; it must be thread-safe.
Responder = Callable[[str, bytes, "Mapping[str, str] | None"], None]


class Msg:
    """A message received on a subscription: immutable, hashable, compared by value.

    :param subject: the subject the message was published to.
    :param data: the payload.
    :param headers: the message headers, or ``None``; kept as a read-only copy (an empty
        mapping becomes ``None``).
    :param reply: the subject to respond to, or ``None``.
    :param responder: how :meth:`respond` publishes; given by the cluster.

    Two messages are equal when their subject, data, headers and reply are; the responder
    is not compared. :attr:`size` is what the message counts for against a subscription's
    byte limit: ``len(data) + len(subject) + len(reply)`` plus, for each header,
    ``len(name) + len(value) + 4`` (characters, not bytes, for the strings: an estimate
    close to what the server counts, without the cost of encoding). Python's own object
    overhead (some 200 bytes a message) is not included.
    """

    __slots__ = ("_data", "_headers", "_reply", "_responder", "_size", "_subject")

    _subject: str
    _data: bytes
    _headers: Mapping[str, str] | None
    _reply: str | None
    _responder: Responder | None
    _size: int

    def __init__(
        self,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | None = None,
        reply: str | None = None,
        *,
        responder: Responder | None = None,
    ) -> None:
        size = len(data) + len(subject)
        if reply:
            size += len(reply)
        else:
            reply = None
        if headers:
            headers = MappingProxyType(dict(headers))
            for name, value in headers.items():
                size += len(name) + len(value) + 4
        else:
            headers = None
        self._subject = subject
        self._data = data
        self._headers = headers
        self._reply = reply
        self._responder = responder
        self._size = size

    @property
    def subject(self) -> str:
        """The subject the message was published to."""
        return self._subject

    @property
    def data(self) -> bytes:
        """The payload."""
        return self._data

    @property
    def headers(self) -> Mapping[str, str] | None:
        """The headers (a read-only mapping), or ``None`` when there are none."""
        return self._headers

    @property
    def reply(self) -> str | None:
        """The subject a response goes to, or ``None``."""
        return self._reply

    @property
    def size(self) -> int:
        """The message's size as counted against the subscription's byte limit."""
        return self._size

    def respond(self, data: bytes, *, headers: Mapping[str, str] | None = None) -> None:
        """Publish *data* to this message's :attr:`reply` subject. Thread-safe.

        The payload and headers are validated by the publish path, as for any publish.

        :raises InvalidMessageError: when the message has no reply subject.
        :raises ClusterUnavailableError: when the message was not received through a
            cluster (built without a responder); the responder's own errors (e.g.
            :class:`ClusterClosedError` once the cluster is closed) pass through.
        """
        reply = self._reply
        if reply is None:
            raise InvalidMessageError(f"cannot respond to a message on {self._subject[:80]!r}: it has no reply subject")
        responder = self._responder
        if responder is None:
            raise ClusterUnavailableError(
                f"cannot respond to a message on {self._subject[:80]!r}: it was not received from a cluster"
            )
        responder(reply, data, headers)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Msg):
            return NotImplemented
        return (
            self._subject == other._subject
            and self._data == other._data
            and self._reply == other._reply
            and self._headers == other._headers
        )

    def __hash__(self) -> int:
        # Headers are left out: a mapping is not hashable, and equal messages still hash equal.
        return hash((self._subject, self._data, self._reply))

    def __repr__(self) -> str:
        return f"<Msg subject={self._subject!r} reply={self._reply!r} data={len(self._data)} bytes>"

    def __copy__(self) -> Msg:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Msg:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # The responder belongs to this process's cluster; an unpickled copy cannot respond.
        headers = dict(self._headers) if self._headers is not None else None
        return (Msg, (self._subject, self._data, headers, self._reply))
