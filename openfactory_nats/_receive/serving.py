"""Serving requests from threads: ``serve(subject, handler, workers=N)``.

A pull subscription read by *workers* threads; each calls the handler with a request
and sends what it returns as the reply. A handler that raises is logged with its
traceback and answered at once with the NATS services error headers, so that the
requester gets a :class:`~openfactory_nats.ServiceError` instead of waiting for its
timeout.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .. import _tracing
from .._errors import InvalidMessageError, InvalidTypeError, NatsClusterError
from .._message import Msg
from .dispatcher import mark_delivering
from .replies import error_headers

__all__ = ("SPREAD_AFTER", "Handler", "Workers", "check_workers", "reply_of", "start_workers")

#: Seconds requests wait for a busy worker before the idle workers are woken for them.
SPREAD_AFTER = 0.001

Handler = Callable[[Msg], Any]


@dataclass(frozen=True)
class Workers:
    """The threads that serve a subscription's requests: *count* threads named after
    *name* run *handler*; made by :meth:`~openfactory_nats.SyncNatsCluster.serve` and
    started, owned and joined by the subscription they read."""

    handler: Handler
    count: int
    logger: logging.Logger
    name: str

    def start(self, messages: Callable[[], Iterator[Msg]], subject: str, queue: str | None) -> list[threading.Thread]:
        return start_workers(messages, self.handler, self.count, self.logger, self.name, subject, queue)


def check_workers(handler: object, workers: object) -> int:
    if not callable(handler):
        raise InvalidTypeError(f"handler must be callable, not {type(handler).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise InvalidTypeError(f"workers must be an int, not {type(workers).__name__}")
    if workers < 1:
        raise InvalidMessageError(f"workers must be at least 1, not {workers}")
    return workers


def reply_of(result: object) -> tuple[bytes, Mapping[str, str] | None]:
    """The reply a handler's *result* stands for: bytes, or ``(bytes, headers)``.

    :raises InvalidTypeError: for anything else.
    """
    if result is None:
        return b"", None
    if isinstance(result, bytes | bytearray | memoryview):
        return bytes(result), None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bytes | bytearray | memoryview):
        headers = result[1]
        if headers is None or isinstance(headers, Mapping):
            return bytes(result[0]), headers
    raise InvalidTypeError(f"a handler returns bytes or (bytes, headers), not {type(result).__name__}")


def start_workers(
    messages: Callable[[], Iterator[Msg]],
    handler: Handler,
    workers: int,
    logger: logging.Logger,
    name: str,
    subject: str = "",
    queue: str | None = None,
) -> list[threading.Thread]:
    """Start *workers* threads that read *messages()* and answer each request (of the
    subscription to *subject*, in the queue group *queue*: for tracing)."""
    threads = [
        threading.Thread(
            target=_work,
            args=(messages(), handler, logger, name, subject, queue),
            name=f"{name}-{i}" if workers > 1 else name,
            daemon=True,
        )
        for i in range(workers)
    ]
    for thread in threads:
        thread.start()
    return threads


def _work(
    messages: Iterator[Msg], handler: Handler, logger: logging.Logger, name: str, subject: str, queue: str | None
) -> None:
    mark_delivering()
    answer = functools.partial(_answer_request, handler=handler, logger=logger, name=name)
    for msg in messages:  # ends once the subscription is closed and empty
        if (hook := _tracing.HOOK) is not None:  # read once: uninstrument() may clear it
            hook.serve(answer, msg, subject, queue)
        else:
            answer(msg)


def _answer_request(msg: Msg, *, handler: Handler, logger: logging.Logger, name: str) -> None:
    try:
        data, headers = reply_of(handler(msg))
    except BaseException as exc:  # SystemExit too: a dead worker would leave requests unanswered
        logger.exception("%s: the handler raised on a request to %r; answering with an error", name, msg.subject)
        _tracing.failed(exc)
        data, headers = b"", error_headers(exc)
    if msg.reply is not None:  # else a plain message, not a request: nobody to answer
        try:
            msg.respond(data, headers=headers)
        except (InvalidMessageError, InvalidTypeError) as exc:  # a reply that cannot be sent
            logger.exception(
                "%s: the reply to a request to %r cannot be sent; answering with an error", name, msg.subject
            )
            _tracing.failed(exc)
            _answer(msg, b"", error_headers(exc), logger, name)
        except NatsClusterError as exc:
            logger.error("%s: could not answer a request to %r: %s", name, msg.subject, exc)


def _answer(msg: Msg, data: bytes, headers: Mapping[str, str], logger: logging.Logger, name: str) -> None:
    try:
        msg.respond(data, headers=headers)
    except NatsClusterError as exc:
        logger.error("%s: could not answer a request to %r: %s", name, msg.subject, exc)
