"""A service's endpoint: the handler wrapped to keep the ADR-32 stats and to answer
errors as the ADR says (see :mod:`.service`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .. import _tracing
from .._errors import ServiceError
from .._forksafe import renew_after_fork
from .._message import Msg
from .replies import SERVICE_ERROR, error_headers
from .serving import Handler, reply_of
from .subscription import Subscription

__all__ = ("Endpoint",)


class Endpoint:
    """One endpoint of a :class:`~openfactory_nats.Service` (made by its ``endpoint()``):
    its handler runs on the threads of its :attr:`subscription` (a ``serve`` one); its
    stats count every request."""

    def __init__(
        self,
        service: str,
        logger: logging.Logger,
        name: str,
        handler: Handler,
        subject: str,
        queue_group: str,
        metadata: dict[str, str],
        check: Callable[[str, bytes, Mapping[str, str] | None], object],
    ) -> None:
        #: The name of the service it belongs to.
        self.service = service
        self.logger = logger
        self.name = name
        self.subject = subject
        self.queue_group = queue_group
        self.metadata = metadata
        self._handler = handler
        #: Validates a reply as the publish path will (raises what it would raise).
        self._check = check
        self._lock = threading.Lock()
        self._requests = 0
        self._errors = 0
        self._time = 0
        self._last_error = ""
        self.subscription: Subscription | None = None
        renew_after_fork(self)

    def _renew_after_fork(self) -> None:
        # A parent worker counting a request may have held it at the fork: the child's
        # stats() goes through it.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Endpoint {self.name!r} subject={self.subject!r} queue_group={self.queue_group!r}>"

    def handle(self, msg: Msg) -> tuple[bytes, Mapping[str, str] | None]:
        """(A worker thread) Answer one request: the handler's reply, or the error
        headers of what it raised (a :class:`ServiceError`'s code, else 500)."""
        started = time.perf_counter_ns()
        try:
            data, headers = reply_of(self._handler(msg))
            # A reply that cannot be sent (bad headers, over max_payload) is the handler's error.
            self._check(msg.reply or msg.subject, data, headers)
        except ServiceError as exc:
            _tracing.failed(exc)
            answer = error_headers(exc)
            self._count(started, f"{exc.code}:{answer[SERVICE_ERROR]}")
            return b"", answer
        except BaseException as exc:  # as serve's workers: a dead worker would leave requests unanswered
            self.logger.exception(
                "service %s: endpoint %s: the handler raised on a request to %r; answering 500",
                self.service,
                self.name,
                msg.subject,
            )
            _tracing.failed(exc)
            answer = error_headers(exc)
            self._count(started, f"500:{answer[SERVICE_ERROR]}")
            return b"", answer
        self._count(started, None)
        return data, headers

    def _count(self, started: int, error: str | None) -> None:
        elapsed = time.perf_counter_ns() - started
        with self._lock:
            self._requests += 1
            self._time += elapsed
            if error is not None:
                self._errors += 1
                self._last_error = error

    def reset(self) -> None:
        """Zero the stats."""
        with self._lock:
            self._requests = self._errors = self._time = 0
            self._last_error = ""

    def info(self) -> dict[str, Any]:
        """The endpoint's part of the INFO response."""
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": self.queue_group,
            "metadata": dict(self.metadata),
        }

    def stats(self) -> dict[str, Any]:
        """The endpoint's part of the STATS response (times in nanoseconds)."""
        with self._lock:
            requests, errors, spent, last = self._requests, self._errors, self._time, self._last_error
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": self.queue_group,
            "num_requests": requests,
            "num_errors": errors,
            "last_error": last,
            "processing_time": spent,
            "average_processing_time": spent // requests if requests else 0,
            "data": {},
        }
