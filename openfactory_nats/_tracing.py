"""The one switch between the library and its tracing (:mod:`openfactory_nats.otel`).

:data:`HOOK` is None unless :func:`openfactory_nats.otel.instrument` set it. Every traced
place (publish and request, blocking and asyncio; the callbacks of subscriptions;
``serve`` and service handlers; JetStream ``consume`` handlers) reads it once, into a
local (``uninstrument()`` may clear it meanwhile, from another thread), before anything
else, and does its usual work when it is None: tracing costs one attribute test when off,
and nothing here imports OpenTelemetry.

A traced publish or request calls the public method again with its headers wrapped in
:class:`Traced` (the tracer's span is made, its context injected): the method unwraps
them and does its usual work, so that the work is written once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

__all__ = ("HOOK", "Traced", "Tracer", "failed")

T = TypeVar("T")


class Traced(dict[str, str]):
    """The headers of a publish or a request the tracer has handled; empty stands for
    none (the call unwraps them with ``headers or None``)."""

    __slots__ = ()


class Tracer(Protocol):
    """What the traced places call when tracing is on (see :mod:`openfactory_nats.otel`).

    *send* is the public method that was called; the tracer calls it again with
    :class:`Traced` headers. *core* is the cluster's :class:`~openfactory_nats.NatsCluster`.
    """

    def publish(
        self,
        send: Callable[..., T],
        core: Any,
        subject: str,
        payload: object,
        timeout: float | None,
        headers: Mapping[str, str] | None,
        ack: bool,
        msg_id: str | None,
    ) -> T: ...

    async def publish_async(
        self,
        send: Callable[..., Awaitable[T]],
        core: Any,
        subject: str,
        payload: object,
        timeout: float | None,
        headers: Mapping[str, str] | None,
        ack: bool,
        msg_id: str | None,
    ) -> T: ...

    def request(
        self,
        send: Callable[..., T],
        core: Any,
        subject: str,
        payload: object,
        timeout: float | None,
        headers: Mapping[str, str] | None,
    ) -> T: ...

    async def request_async(
        self,
        send: Callable[..., Awaitable[T]],
        core: Any,
        subject: str,
        payload: object,
        timeout: float | None,
        headers: Mapping[str, str] | None,
    ) -> T: ...

    def consumer(self, callback: Callable[[Any], object], subject: str, queue: str | None) -> Callable[[Any], object]:
        """*callback* running each message in a CONSUMER span (exceptions recorded,
        then raised again); *subject* is the subscription's filter."""

    def consumer_async(
        self, callback: Callable[[Any], Awaitable[object]], subject: str, queue: str | None
    ) -> Callable[[Any], Awaitable[object]]:
        """The same for an asyncio subscription's coroutine callback."""

    def serve(self, answer: Callable[[Any], None], msg: Any, subject: str, queue: str | None) -> None:
        """Run ``answer(msg)`` (a request's handler and reply) in a SERVER span."""

    def jetstream(self, handler: Callable[[Any], object], msg: Any, consumer: str) -> None:
        """Run ``handler(msg)`` for a JetStream consumer in a CONSUMER span (exceptions
        recorded, then raised again)."""

    async def jetstream_async(self, handler: Callable[[Any], Awaitable[object]], msg: Any, consumer: str) -> None:
        """The same for an asyncio pool's coroutine *handler*."""

    def failed(self, exc: BaseException) -> None:
        """Record *exc* on the current span (a handler's error that is answered, not raised)."""


#: The tracer, when tracing is on; set and cleared by :mod:`openfactory_nats.otel` only.
HOOK: Tracer | None = None


def failed(exc: BaseException) -> None:
    """Record a handler's *exc* on the current span, when tracing is on."""
    hook = HOOK
    if hook is not None:
        hook.failed(exc)
