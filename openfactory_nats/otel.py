"""OpenTelemetry tracing for every cluster of the process: call :func:`instrument` once.

Needs the optional extra ``openfactory-nats[otel]`` (``opentelemetry-api``; an SDK such as
``opentelemetry-sdk`` to record anything); the rest of the library does not import it.

.. code-block:: python

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from openfactory_nats import otel

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    otel.instrument()              # the global provider and propagator, or give your own

Once instrumented, for every :class:`~openfactory_nats.SyncNatsCluster`,
:class:`~openfactory_nats.NatsCluster` and router (whose publishes and requests go
through their clusters'):

* ``publish`` (blocking or asyncio, ``ack=True`` too) makes a PRODUCER span ``send
  <subject>``, ended when the message is queued (when acknowledged, with ``ack``), and
  injects its context into the message's headers through the propagator (W3C
  ``traceparent``/``tracestate`` by default). The caller's headers are kept; when they
  already hold a ``traceparent`` (any case), nothing is injected: the caller's context
  wins.
* ``request`` makes a CLIENT span ``request <subject>``, injected likewise, ended when
  the reply came (or the request failed).
* A subscription's callback (blocking or asyncio) runs in a CONSUMER span ``process
  <subscription subject>``; a ``serve`` or service endpoint handler in a SERVER span of
  the same name (a CONSUMER span for a message without a reply subject); a JetStream
  ``consume`` handler in a CONSUMER span ``process <subject>``. Their parent is the
  context extracted from the message's headers (a message without one starts a trace),
  which is also added as a link. A handler's exception is recorded on its span, with
  an error status (also when the library answers it with an error reply).

The library's own traffic (JetStream API requests and acknowledgements, subjects under
``$JS.``) is not traced. Spans follow the OpenTelemetry messaging semantic conventions
1.44 (still "Development"): ``messaging.system`` = ``nats`` (no registered value: the one
nats.net uses), ``messaging.destination.name`` (the message's subject),
``messaging.destination.template`` (a subscription's subject filter, when it has
wildcards), ``messaging.operation.type`` (``send``, ``process``) and
``messaging.operation.name`` (``send``, ``request``, ``process``),
``messaging.message.body.size``, ``messaging.message.id`` (``Nats-Msg-Id``),
``messaging.consumer.group.name`` (the queue group; a JetStream consumer's name, also
given as ``messaging.destination.subscription.name``), ``server.address`` and
``server.port`` (the server a publish or request goes to, when connected), and
``error.type`` with the exception's class.

OpenTelemetry never breaks messaging: when the SDK, a span processor or the propagator
raises, the message goes on without that span or context, and the failure is logged
once (per kind: starting or ending a span, injecting, extracting).

Free when off: before :func:`instrument`, after :func:`uninstrument`, and when the
provider can record nothing (a no-op provider, or a sampler that is ``ALWAYS_OFF``) the
library tests one module attribute per publish and per batch of received messages; no
context is propagated then either.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

try:
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import Getter, TextMapPropagator
    from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "openfactory_nats.otel needs OpenTelemetry: pip install 'openfactory-nats[otel]'", name=exc.name
    ) from exc

from . import __version__, _tracing
from ._wire import encode_headers

__all__ = ("instrument", "uninstrument")

T = TypeVar("T")

_SYSTEM = "nats"
_SCHEMA = "https://opentelemetry.io/schemas/1.44.0"  # the conventions followed
_INTERNAL = "$JS."  # the library's own JetStream traffic: API requests, acknowledgements
_MSG_ID = "Nats-Msg-Id"
_lock = threading.Lock()
_instrumented = False
_log = logging.getLogger(__name__)
_told: set[str] = set()  # what OpenTelemetry failed to do, logged once each


def instrument(tracer_provider: TracerProvider | None = None, propagator: TextMapPropagator | None = None) -> None:
    """Trace every cluster of the process from now on (see the module's description).
    Idempotent: a second call, until :func:`uninstrument`, changes nothing.

    :param tracer_provider: where spans go; the global one (read now) when None.
    :param propagator: how the context travels in the headers; the global one (read at
        each message) when None.
    """
    global _instrumented
    with _lock:
        if _instrumented:
            return
        _instrumented = True
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        tracer = trace.get_tracer(__name__, __version__, provider, schema_url=_SCHEMA)
        if not _records_nothing(provider, tracer):
            _tracing.HOOK = _Tracer(tracer, propagator)


def uninstrument() -> None:
    """Stop tracing: nothing is recorded nor injected from now on (a span already
    started still ends). Idempotent."""
    global _instrumented
    with _lock:
        _instrumented = False
        _tracing.HOOK = None


def _records_nothing(provider: TracerProvider, tracer: trace.Tracer) -> bool:
    if isinstance(provider, trace.NoOpTracerProvider) or isinstance(tracer, trace.NoOpTracer):
        return True
    sampler = getattr(provider, "sampler", None)  # the SDK's provider: fixed when it is made
    describe = getattr(sampler, "get_description", None)
    return callable(describe) and describe() == "AlwaysOffSampler"


class _HeaderGetter(Getter[Mapping[str, str]]):
    """NATS headers keep the case they were given: ``Traceparent`` (e.g. from Go) too."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            value = next((v for k, v in carrier.items() if k.lower() == key), None)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _HeaderGetter()


def _has_traceparent(headers: Mapping[str, str] | None) -> bool:
    return bool(headers) and any(name.lower() == "traceparent" for name in headers)  # type: ignore[union-attr]


def _body_size(payload: object) -> int | None:
    if isinstance(payload, bytes | bytearray):
        return len(payload)
    if isinstance(payload, memoryview):
        return payload.nbytes
    return None  # not bytes-like: the publish raises


def _broken(what: str, exc: Exception) -> None:
    """OpenTelemetry (the SDK, a span processor, a propagator) raised: messaging goes on
    without it, and each kind of failure is logged once."""
    with _lock:
        if what in _told:
            return
        _told.add(what)
    _log.error("OpenTelemetry failed to %s; messages go on without it (logged once): %r", what, exc, exc_info=exc)


def _end(span: Span) -> None:
    try:
        span.end()
    except Exception as exc:
        _broken("end a span", exc)


def _record(span: Span, exc: BaseException) -> None:
    try:
        if span.is_recording():
            kind = type(exc)
            name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
            span.set_attribute("error.type", name)
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{kind.__name__}: {exc}"))
    except Exception as broken:
        _broken("record an exception", broken)


class _Tracer:
    """The hook (:class:`openfactory_nats._tracing.Tracer`) :func:`instrument` installs."""

    def __init__(self, tracer: trace.Tracer, propagator: TextMapPropagator | None) -> None:
        self._tracer = tracer
        self._propagator = propagator

    def _textmap(self) -> TextMapPropagator:
        return self._propagator if self._propagator is not None else propagate.get_global_textmap()

    # -- sending -----------------------------------------------------------------------
    def _start_send(
        self, core: Any, operation: str, kind: SpanKind, subject: str, payload: object, msg_id: str | None
    ) -> Span | None:
        """The span of a send, or None when OpenTelemetry failed to start one."""
        attributes: dict[str, Any] = {
            "messaging.system": _SYSTEM,
            "messaging.destination.name": subject,
            "messaging.operation.type": "send",
            "messaging.operation.name": operation,
        }
        size = _body_size(payload)
        if size is not None:
            attributes["messaging.message.body.size"] = size
        if msg_id is not None:
            attributes["messaging.message.id"] = msg_id
        peer = core.peer
        if peer is not None:
            attributes["server.address"], attributes["server.port"] = peer
        try:
            return self._tracer.start_span(f"{operation} {subject}", kind=kind, attributes=attributes)
        except Exception as exc:
            _broken("start a span", exc)
            return None

    def _headers(self, span: Span, headers: Mapping[str, str] | None) -> _tracing.Traced:
        """The headers to send: the caller's, and the span's context unless they hold one."""
        if headers is not None and not isinstance(headers, Mapping):
            encode_headers(headers)  # raises what the publish would
        carrier = _tracing.Traced(headers) if headers else _tracing.Traced()
        if not _has_traceparent(headers):
            try:
                self._textmap().inject(carrier, context=trace.set_span_in_context(span))
            except Exception as exc:
                _broken("inject a context into headers", exc)
                return _tracing.Traced(headers) if headers else _tracing.Traced()  # what it wrote, undone
        return carrier

    @contextlib.contextmanager
    def _sending(
        self,
        core: Any,
        operation: str,
        kind: SpanKind,
        subject: object,
        payload: object,
        msg_id: str | None,
        headers: Mapping[str, str] | None,
    ) -> Iterator[_tracing.Traced]:
        """The headers to send with, inside the send's span, which records what the send
        raises; the caller's headers as they are for the library's own subjects (and a
        subject that is not a string: the send refuses it) or when no span could start."""
        if not isinstance(subject, str) or subject.startswith(_INTERNAL):
            yield _untouched(headers)
            return
        span = self._start_send(core, operation, kind, subject, payload, msg_id)
        if span is None:
            yield _untouched(headers)
            return
        try:
            yield self._headers(span, headers)
        except BaseException as exc:
            _record(span, exc)
            raise
        finally:
            _end(span)

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
    ) -> T:
        with self._sending(core, "send", SpanKind.PRODUCER, subject, payload, msg_id, headers) as traced:
            return send(subject, payload, timeout, headers=traced, ack=ack, msg_id=msg_id)

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
    ) -> T:
        with self._sending(core, "send", SpanKind.PRODUCER, subject, payload, msg_id, headers) as traced:
            return await send(subject, payload, headers=traced, timeout=timeout, ack=ack, msg_id=msg_id)

    def request(
        self,
        send: Callable[..., T],
        core: Any,
        subject: str,
        payload: object,
        timeout: float | None,
        headers: Mapping[str, str] | None,
    ) -> T:
        with self._sending(core, "request", SpanKind.CLIENT, subject, payload, None, headers) as traced:
            return send(subject, payload, timeout, headers=traced)

    async def request_async(
        self,
        send: Callable[..., Awaitable[T]],
        core: Any,
        subject: str,
        payload: object,
        timeout: float | None,
        headers: Mapping[str, str] | None,
    ) -> T:
        with self._sending(core, "request", SpanKind.CLIENT, subject, payload, None, headers) as traced:
            return await send(subject, payload, timeout, headers=traced)

    # -- receiving ---------------------------------------------------------------------
    def _start_process(
        self, msg: Any, kind: SpanKind, filt: str | None, group: str | None, sub: str | None
    ) -> Span | None:
        """The span of a message's handling, or None when OpenTelemetry failed to start one."""
        subject: str = msg.subject
        data = msg.data
        attributes: dict[str, Any] = {
            "messaging.system": _SYSTEM,
            "messaging.destination.name": subject,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.message.body.size": len(data),
        }
        destination = subject
        if filt is not None and ("*" in filt or ">" in filt):
            attributes["messaging.destination.template"] = destination = filt
        if group is not None:
            attributes["messaging.consumer.group.name"] = group
        if sub is not None:
            attributes["messaging.destination.subscription.name"] = sub
        headers: Mapping[str, str] | None = msg.headers
        parent = Context()  # a message without a context starts a trace, whatever the thread's
        links: Sequence[Link] = ()
        if headers:
            msg_id = headers.get(_MSG_ID)
            if msg_id is not None:
                attributes["messaging.message.id"] = msg_id
            try:
                parent = self._textmap().extract(headers, context=Context(), getter=_GETTER)
            except Exception as exc:
                _broken("extract a context from headers", exc)
            creation = trace.get_current_span(parent).get_span_context()
            if creation.is_valid:
                links = (Link(creation),)
        try:
            return self._tracer.start_span(
                f"process {destination}", context=parent, kind=kind, attributes=attributes, links=links
            )
        except Exception as exc:
            _broken("start a span", exc)
            return None

    def _process(
        self,
        run: Callable[[Any], T],
        msg: Any,
        kind: SpanKind,
        filt: str | None,
        group: str | None,
        sub: str | None = None,
    ) -> T:
        span = self._start_process(msg, kind, filt, group, sub)
        if span is None:
            return run(msg)
        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                try:
                    return run(msg)
                except BaseException as exc:
                    _record(span, exc)
                    raise
        finally:
            _end(span)

    async def _process_async(
        self,
        run: Callable[[Any], Awaitable[T]],
        msg: Any,
        kind: SpanKind,
        filt: str | None,
        group: str | None,
        sub: str | None = None,
    ) -> T:
        span = self._start_process(msg, kind, filt, group, sub)
        if span is None:
            return await run(msg)
        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                try:
                    return await run(msg)
                except BaseException as exc:
                    _record(span, exc)
                    raise
        finally:
            _end(span)

    def consumer(self, callback: Callable[[Any], object], subject: str, queue: str | None) -> Callable[[Any], object]:
        def traced(msg: Any) -> object:
            return self._process(callback, msg, SpanKind.CONSUMER, subject, queue)

        return traced

    def consumer_async(
        self, callback: Callable[[Any], Awaitable[object]], subject: str, queue: str | None
    ) -> Callable[[Any], Awaitable[object]]:
        async def traced(msg: Any) -> object:
            return await self._process_async(callback, msg, SpanKind.CONSUMER, subject, queue)

        return traced

    def serve(self, answer: Callable[[Any], None], msg: Any, subject: str, queue: str | None) -> None:
        kind = SpanKind.SERVER if msg.reply is not None else SpanKind.CONSUMER
        self._process(answer, msg, kind, subject, queue)

    def jetstream(self, handler: Callable[[Any], object], msg: Any, consumer: str) -> None:
        self._process(handler, msg, SpanKind.CONSUMER, None, consumer, consumer)

    async def jetstream_async(self, handler: Callable[[Any], Awaitable[object]], msg: Any, consumer: str) -> None:
        await self._process_async(handler, msg, SpanKind.CONSUMER, None, consumer, consumer)

    def failed(self, exc: BaseException) -> None:
        _record(trace.get_current_span(), exc)


def _untouched(headers: Mapping[str, str] | None) -> _tracing.Traced:
    """Headers passed on as given, marked so that the call is not traced."""
    if headers is not None and not isinstance(headers, Mapping):
        encode_headers(headers)  # raises what the publish would
    return _tracing.Traced(headers) if headers else _tracing.Traced()
