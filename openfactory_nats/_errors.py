"""Exceptions raised by openfactory-nats.

Every error the library raises derives from :class:`NatsClusterError` and from the
built-in exception that users already catch::

    NatsClusterError (Exception)
    ├── InvalidMessageError (ValueError)     bad subject, headers, payload size, timeout
    ├── InvalidTypeError (TypeError)         wrong type of subject, payload, headers, timeout
    ├── ClusterUnavailableError (RuntimeError)
    │   ├── ConnectError                     the cluster could not be reached in time
    │   │   └── ConnectTimeoutError (TimeoutError)
    │   ├── ClusterClosedError               the instance was closed
    │   │   └── SubscriptionClosedError      the subscription was closed (and is empty)
    │   ├── RefusedError                     the server refused it (permissions, limits)
    │   └── PublishError                     the client refused a message
    ├── SubscriptionModeError (RuntimeError) next_msg on a subscription with a callback
    ├── NoRespondersError                    nobody listens on a request's subject
    ├── ServiceError                         the service answered a request with an error
    ├── JetStreamError                       the JetStream API refused (``code``, ``err_code``)
    │   ├── StreamNotFoundError              no such stream (or none bound to a subject)
    │   │   └── BucketNotFoundError          no such key-value bucket
    │   ├── ConsumerNotFoundError            no such consumer
    │   └── RevisionMismatchError            a key-value update: the key moved on
    │       └── KeyExistsError               a key-value create: the key has a value
    ├── KeyNotFoundError (KeyError)          no such key in a bucket (or it was deleted)
    ├── MsgAlreadyAckedError (RuntimeError)  a JetStream message acknowledged twice
    ├── WrongThreadError (RuntimeError)      a blocking call on the event-loop thread
    └── ClusterTimeoutError (TimeoutError)   an operation ran out of time
        └── BufferFullError                  no room in the bounded outgoing buffer

nats-py's errors are mapped to these in :func:`map_nats_error`, and only there.
"""

from __future__ import annotations

import nats.errors

__all__ = (
    "BucketNotFoundError",
    "BufferFullError",
    "ClusterClosedError",
    "ClusterTimeoutError",
    "ClusterUnavailableError",
    "ConnectError",
    "ConnectTimeoutError",
    "InvalidMessageError",
    "InvalidTypeError",
    "JetStreamError",
    "KeyExistsError",
    "KeyNotFoundError",
    "RevisionMismatchError",
    "ConsumerNotFoundError",
    "MsgAlreadyAckedError",
    "StreamNotFoundError",
    "NatsClusterError",
    "NoRespondersError",
    "PublishError",
    "RefusedError",
    "ServiceError",
    "SubscriptionClosedError",
    "SubscriptionModeError",
    "WrongThreadError",
)


class NatsClusterError(Exception):
    """Root of every error raised by openfactory-nats.

    :ivar cluster: the logical name of the cluster concerned, or ``None``.
    """

    def __init__(self, message: str, *, cluster: str | None = None) -> None:
        super().__init__(message)
        self.cluster = cluster


class InvalidMessageError(NatsClusterError, ValueError):
    """A subject, header, payload size or timeout value is not acceptable."""


class InvalidTypeError(NatsClusterError, TypeError):
    """A subject, payload, header or timeout has the wrong type."""


class ClusterUnavailableError(NatsClusterError, RuntimeError):
    """The cluster cannot take the request (not reachable, closed, or refusing)."""


class ConnectError(ClusterUnavailableError):
    """The cluster could not be connected to within the deadline."""


class ConnectTimeoutError(ConnectError, TimeoutError):
    """The caller's timeout ran out while the connection was being made."""


class ClusterClosedError(ClusterUnavailableError):
    """The instance has been closed; it cannot be used again."""


class RefusedError(ClusterUnavailableError):
    """The server refused the operation (permissions, limits)."""


class PublishError(ClusterUnavailableError):
    """The client refused the message for a reason other than its content."""


class SubscriptionClosedError(ClusterClosedError):
    """The subscription is closed and nothing is left to read.

    :ivar subject: the subscription's subject filter.
    """

    def __init__(self, message: str, *, cluster: str | None = None, subject: str = "") -> None:
        super().__init__(message, cluster=cluster)
        self.subject = subject


class SubscriptionModeError(NatsClusterError, RuntimeError):
    """A pull method was called on a subscription that has a callback."""


class NoRespondersError(NatsClusterError):
    """Nobody listens on the subject of a request (the server said so at once)."""


class ServiceError(NatsClusterError):
    """The service answered a request with an error (the NATS services error headers).

    A handler (of ``serve`` or a service endpoint) raises ``ServiceError(code,
    description)`` to answer with that error: the requester gets a ``ServiceError`` with
    the same ``code`` and ``description``.

    :ivar code: the ``Nats-Service-Error-Code`` (500 when a handler raised).
    :ivar description: the ``Nats-Service-Error`` text.
    """

    def __init__(
        self, message: str | int, description: str = "", *, cluster: str | None = None, code: int | None = None
    ) -> None:
        if isinstance(message, int) and not isinstance(message, bool):  # ServiceError(code, description)
            code, message = message, f"service error {message}: {description}"
        elif not isinstance(message, str):
            raise InvalidTypeError(f"ServiceError takes a code (int) or a message (str), not {type(message).__name__}")
        super().__init__(message, cluster=cluster)
        self.code = 500 if code is None else code
        self.description = description


class JetStreamError(NatsClusterError):
    """The JetStream API answered with an error, or JetStream is not available.

    :ivar code: the API's status code (e.g. 404, 400, 503 when no JetStream answered).
    :ivar err_code: the server's JetStream error code (e.g. 10059 stream not found), or 0.
    :ivar description: the server's description.
    """

    def __init__(
        self, message: str, *, cluster: str | None = None, code: int = 0, err_code: int = 0, description: str = ""
    ) -> None:
        super().__init__(message, cluster=cluster)
        self.code = code
        self.err_code = err_code
        self.description = description


class StreamNotFoundError(JetStreamError):
    """No such stream, or no stream stores the subject."""


class ConsumerNotFoundError(JetStreamError):
    """No such consumer (never made, or deleted)."""


class BucketNotFoundError(StreamNotFoundError):
    """No such key-value bucket (its stream ``KV_<bucket>`` does not exist).

    :ivar bucket: the bucket's name.
    """

    def __init__(
        self,
        message: str,
        *,
        cluster: str | None = None,
        code: int = 404,
        err_code: int = 10059,
        description: str = "",
        bucket: str = "",
    ) -> None:
        super().__init__(message, cluster=cluster, code=code, err_code=err_code, description=description)
        self.bucket = bucket


class RevisionMismatchError(JetStreamError):
    """A conditional write (``update(key, value, last=...)``) found the key at another
    revision.

    :ivar bucket: the bucket's name.
    :ivar key: the key.
    :ivar last: the revision the write expected.
    """

    def __init__(
        self,
        message: str,
        *,
        cluster: str | None = None,
        code: int = 400,
        err_code: int = 10071,
        description: str = "",
        bucket: str = "",
        key: str = "",
        last: int = 0,
    ) -> None:
        super().__init__(message, cluster=cluster, code=code, err_code=err_code, description=description)
        self.bucket = bucket
        self.key = key
        self.last = last


class KeyExistsError(RevisionMismatchError):
    """``create(key, value)`` found a value under the key (not deleted or purged)."""


class KeyNotFoundError(NatsClusterError, KeyError):
    """No value under the key: never put, deleted or purged (also a ``KeyError``).

    :ivar bucket: the bucket's name.
    :ivar key: the key.
    :ivar revision: the revision of the delete or purge marker, or 0.
    :ivar operation: ``"DEL"`` or ``"PURGE"`` for a deleted or purged key, else ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        cluster: str | None = None,
        bucket: str = "",
        key: str = "",
        revision: int = 0,
        operation: str | None = None,
    ) -> None:
        super().__init__(message, cluster=cluster)
        self.bucket = bucket
        self.key = key
        self.revision = revision
        self.operation = operation

    def __str__(self) -> str:  # KeyError's would show the message quoted
        return str(self.args[0]) if self.args else ""


class MsgAlreadyAckedError(NatsClusterError, RuntimeError):
    """A JetStream message was acknowledged (ack, nak or term) a second time."""


class WrongThreadError(NatsClusterError, RuntimeError):
    """A blocking call was made on the event-loop thread, where it would deadlock."""


class ClusterTimeoutError(NatsClusterError, TimeoutError):
    """An operation did not finish within its timeout."""


class BufferFullError(ClusterTimeoutError):
    """The bounded outgoing buffer had no room for the message within the timeout.

    :ivar capacity: the buffer's capacity in bytes.
    :ivar size: the size of the refused message in bytes.
    """

    def __init__(self, message: str, *, cluster: str | None, capacity: int, size: int) -> None:
        super().__init__(message, cluster=cluster)
        self.capacity = capacity
        self.size = size


def map_nats_error(exc: BaseException, cluster: str) -> NatsClusterError:
    """Translate an exception raised by nats-py into one of ours.

    The message never includes the exception's text verbatim where it could carry a URL
    with credentials; :func:`openfactory_nats._redact.redact` cleans what is kept.
    """
    from ._redact import redact

    detail = redact(str(exc) or type(exc).__name__)
    if isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.ConnectionDrainingError):
        return ClusterClosedError(f"cluster {cluster!r}: connection closed ({detail})", cluster=cluster)
    if isinstance(exc, nats.errors.MaxPayloadError):
        return InvalidMessageError(f"cluster {cluster!r}: payload too large ({detail})", cluster=cluster)
    if isinstance(exc, nats.errors.BadSubjectError):
        return InvalidMessageError(f"cluster {cluster!r}: invalid subject", cluster=cluster)
    if isinstance(exc, nats.errors.BadHeaderError | nats.errors.BadTimeoutError):
        return InvalidMessageError(f"cluster {cluster!r}: {detail}", cluster=cluster)
    if isinstance(exc, TimeoutError):
        return ClusterTimeoutError(f"cluster {cluster!r}: timed out ({detail})", cluster=cluster)
    return PublishError(f"cluster {cluster!r}: {type(exc).__name__}: {detail}", cluster=cluster)
