"""Tracing's edges (openfactory_nats.otel): uninstrument() racing the traced places, a
broken propagator or span processor, the caller's headers, context between messages."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import types
from collections.abc import Iterator, Sequence
from typing import Any

import nats
import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import CarrierT, Getter, Setter, TextMapPropagator
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from openfactory_nats import Msg, NatsCluster, SyncNatsCluster, _tracing, otel

from .servers import NatsServer

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    made = TracerProvider()
    try:
        yield made
    finally:
        made.shutdown()


@pytest.fixture
def exporter(provider: TracerProvider) -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    otel.instrument(tracer_provider=provider)
    try:
        yield spans
    finally:
        otel.uninstrument()


def wait_spans(spans: InMemorySpanExporter, count: int, timeout: float = 10.0) -> list[ReadableSpan]:
    deadline = time.monotonic() + timeout
    while len(spans.get_finished_spans()) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    got = list(spans.get_finished_spans())
    assert len(got) >= count, [s.name for s in got]
    return got


def collect(into: list[Msg], count: int, done: threading.Event) -> Any:
    def callback(msg: Msg) -> None:
        into.append(msg)
        if len(into) >= count:
            done.set()

    return callback


# -- uninstrument() between a traced place's test of HOOK and its use ------------------------
class _Flickering(types.ModuleType):
    """``_tracing`` as a thread sees it while another one calls instrument() and
    uninstrument() without end: each thread's reads of HOOK alternate, set then None."""

    hook: Any = None
    reads = threading.local()

    @property
    def HOOK(self) -> Any:  # noqa: N802 - the module attribute it stands for
        count = getattr(self.reads, "count", 0)
        self.reads.count = count + 1
        return type(self).hook if count % 2 == 0 else None

    @HOOK.setter
    def HOOK(self, value: Any) -> None:  # noqa: N802
        type(self).hook = value


@pytest.fixture
def flickering(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    _Flickering.hook = _tracing.HOOK
    assert _Flickering.hook is not None
    _tracing.__class__ = _Flickering
    try:
        yield exporter
    finally:
        _tracing.__class__ = types.ModuleType


@pytest.mark.timeout(30)
def test_uninstrument_racing_the_blocking_places_breaks_nothing(
    flickering: InMemorySpanExporter, client: SyncNatsCluster, service: SyncNatsCluster
) -> None:
    got: list[Msg] = []
    done = threading.Event()
    sub = client.subscribe("edge.flicker", collect(got, 6, done))
    served = service.serve("edge.flicker.echo", lambda msg: msg.data)
    headers = {"k": "v"}
    for i in range(6):  # a publish sees HOOK set, then None
        client.publish("edge.flicker", b"%d" % i, headers=headers)
    assert done.wait(10), len(got)  # every batch of the callback too
    assert headers == {"k": "v"}
    for _ in range(4):  # the request, and serve's worker (it would die)
        assert client.request("edge.flicker.echo", b"ping", 5).data == b"ping"
    served.unsubscribe()
    sub.unsubscribe()
    assert all(msg.headers is not None and msg.headers["k"] == "v" for msg in got)


@pytest.mark.timeout(30)
def test_uninstrument_racing_the_asyncio_places_breaks_nothing(
    flickering: InMemorySpanExporter, server: NatsServer
) -> None:
    async def main() -> None:
        core = NatsCluster("aio", [server.url], logging.getLogger("test.otel"))
        await core.connect()
        got: list[Msg] = []
        done = asyncio.Event()

        async def on_msg(msg: Msg) -> None:
            got.append(msg)
            if len(got) == 6:
                done.set()

        async def echo(msg: Any) -> None:
            await msg.respond(msg.data)

        nc = await nats.connect(server.url)
        await nc.subscribe("aio.flicker.echo", cb=echo)
        await nc.flush()
        sub = await core.subscribe("aio.flicker", on_msg)
        for i in range(6):
            await core.publish("aio.flicker", b"%d" % i)
            await asyncio.sleep(0.01)  # one delivery task each
        await asyncio.wait_for(done.wait(), 10)
        for _ in range(4):
            assert (await core.request("aio.flicker.echo", b"e", 5)).data == b"e"
        await sub.unsubscribe()
        await nc.close()
        await core.close()

    asyncio.run(main())


# -- a broken propagator, span processor or exporter ---------------------------------------
class BrokenPropagator(TextMapPropagator):
    def extract(
        self, carrier: CarrierT, context: Context | None = None, getter: Getter[CarrierT] | None = None
    ) -> Context:
        raise RuntimeError("extract broke")

    def inject(self, carrier: CarrierT, context: Context | None = None, setter: Setter[CarrierT] | None = None) -> None:
        raise RuntimeError("inject broke")

    @property
    def fields(self) -> set[str]:
        return {"traceparent"}


class BrokenProcessor(SpanProcessor):
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        raise RuntimeError("on_start broke")

    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("on_end broke")


class BrokenExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise RuntimeError("export broke")


def messaging_works(client: SyncNatsCluster, service: SyncNatsCluster, subject: str) -> list[Msg]:
    """Publish, callbacks, request and serve: nothing raises, nothing is lost."""
    got: list[Msg] = []
    done = threading.Event()
    sub = service.subscribe(subject, collect(got, 3, done))
    served = service.serve(f"{subject}.echo", lambda msg: msg.data.upper())
    client.flush(5)
    service.flush(5)
    for i in range(3):
        client.publish(subject, b"%d" % i, headers={"k": "v"})
    assert done.wait(10), len(got)
    assert client.request(f"{subject}.echo", b"ping", 5).data == b"PING"
    assert client.request(f"{subject}.echo", b"pong", 5).data == b"PONG"
    served.unsubscribe()
    sub.unsubscribe()
    assert sub.errors == 0
    return got


def otel_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "openfactory_nats.otel"]


@pytest.mark.timeout(30)
def test_a_broken_propagator_is_contained_and_logged_once(
    provider: TracerProvider, client: SyncNatsCluster, service: SyncNatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    otel._told.clear()  # logged once per process: this test's own
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    otel.instrument(tracer_provider=provider, propagator=BrokenPropagator())
    try:
        with caplog.at_level(logging.WARNING, logger="openfactory_nats.otel"):
            got = messaging_works(client, service, "edge.badprop")
    finally:
        otel.uninstrument()
    assert all(msg.headers == {"k": "v"} for msg in got)  # nothing injected
    records = otel_records(caplog)
    assert len(records) == 2, [r.getMessage() for r in records]  # inject once, extract once
    finished = wait_spans(spans, 8)
    assert len([s for s in finished if s.kind is SpanKind.PRODUCER]) == 3  # still traced


@pytest.mark.timeout(30)
def test_a_span_processor_that_raises_is_contained_and_logged_once(
    provider: TracerProvider, client: SyncNatsCluster, service: SyncNatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    otel._told.clear()  # logged once per process: this test's own
    provider.add_span_processor(BrokenProcessor())
    otel.instrument(tracer_provider=provider)
    try:
        with caplog.at_level(logging.WARNING, logger="openfactory_nats.otel"):
            messaging_works(client, service, "edge.badproc")
    finally:
        otel.uninstrument()
    records = otel_records(caplog)
    assert 1 <= len(records) <= 2, [r.getMessage() for r in records]  # a span's start, its end


@pytest.mark.timeout(30)
def test_an_exporter_that_raises_breaks_nothing(
    provider: TracerProvider, client: SyncNatsCluster, service: SyncNatsCluster
) -> None:
    provider.add_span_processor(SimpleSpanProcessor(BrokenExporter()))  # the SDK contains it
    otel.instrument(tracer_provider=provider)
    try:
        messaging_works(client, service, "edge.badexp")
    finally:
        otel.uninstrument()


# -- headers, context ------------------------------------------------------------------------
class Headers(dict[str, str]):
    """A caller's own dict subclass."""


def test_the_callers_headers_are_never_modified_and_arrive_as_plain_dicts(
    exporter: InMemorySpanExporter, client: SyncNatsCluster, server: NatsServer
) -> None:
    async def plain(into: list[Any], ready: threading.Event, done: threading.Event) -> None:
        nc = await nats.connect(server.url)
        sub = await nc.subscribe("edge.hdrs")
        await nc.flush()
        ready.set()
        for _ in range(3):
            into.append(await sub.next_msg(10))
        done.set()
        await nc.close()

    seen: list[Any] = []
    ready, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(plain(seen, ready, done)))
    thread.start()
    assert ready.wait(10)
    mine = Headers(k="v")
    plain_dict = {"k": "w"}
    theirs = {"TRACEPARENT": TRACEPARENT}
    client.publish("edge.hdrs", b"1", headers=mine)
    client.publish("edge.hdrs", b"2", headers=plain_dict)
    client.publish("edge.hdrs", b"3", headers=theirs)
    thread.join(15)
    assert done.is_set()
    assert mine == {"k": "v"} and type(mine) is Headers
    assert plain_dict == {"k": "w"} and theirs == {"TRACEPARENT": TRACEPARENT}
    assert "traceparent" in seen[0].headers and seen[0].headers["k"] == "v"
    assert "traceparent" in seen[1].headers
    assert seen[2].headers == {"TRACEPARENT": TRACEPARENT}  # the caller's, in any case, wins


def test_a_callbacks_span_is_not_the_parent_of_the_next_message(
    exporter: InMemorySpanExporter, client: SyncNatsCluster, server: NatsServer
) -> None:
    got: list[Msg] = []
    done = threading.Event()
    sub = client.subscribe("edge.ctx", collect(got, 2, done))
    client.flush(5)

    async def plain() -> None:  # no context: each must start its own trace
        nc = await nats.connect(server.url)
        await nc.publish("edge.ctx", b"1")
        await nc.publish("edge.ctx", b"2", headers={"Traceparent": TRACEPARENT})
        await nc.flush()
        await nc.close()

    asyncio.run(plain())
    assert done.wait(10)
    sub.unsubscribe()
    first, second = [s for s in wait_spans(exporter, 2) if s.kind is SpanKind.CONSUMER]
    assert first.parent is None and second.parent is not None
    assert second.context is not None and format(second.context.trace_id, "032x") == TRACEPARENT.split("-")[1]
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left behind on this thread


def test_a_publish_that_fails_ends_its_span_with_an_error(
    exporter: InMemorySpanExporter, client: SyncNatsCluster
) -> None:
    from openfactory_nats import InvalidMessageError

    with pytest.raises(InvalidMessageError):
        client.publish("edge.bad", b"x", headers={"bad name": "v"})
    with pytest.raises(InvalidMessageError):
        client.publish("edge.bad", b"x" * (2 << 20))
    failed = [s for s in wait_spans(exporter, 2) if s.kind is SpanKind.PRODUCER]
    assert len(failed) == 2 and all(s.end_time is not None for s in failed)
    assert {s.attributes["error.type"] for s in failed} == {"openfactory_nats._errors.InvalidMessageError"}  # type: ignore[index]


@pytest.mark.timeout(60)
def test_an_asyncio_consume_handler_continues_a_nats_py_jetstream_publish(
    exporter: InMemorySpanExporter, jetstream_server: NatsServer, logger: logging.Logger
) -> None:
    """nats-py's own JetStream publishes with a traceparent; the asyncio pool's handler
    runs in a CONSUMER span of that trace; a handler that raises is recorded."""
    handled: list[str] = []

    async def main() -> None:
        peer = await nats.connect(jetstream_server.url)
        peer_js = peer.jetstream()
        await peer_js.add_stream(name="OTAIO", subjects=["otaio.>"])
        await peer_js.publish("otaio.ok", b"1", headers={"traceparent": TRACEPARENT})
        await peer_js.publish("otaio.bad", b"2", headers={"traceparent": TRACEPARENT})
        core = NatsCluster("aio", [jetstream_server.url], logger)
        await core.connect()
        done = asyncio.Event()

        async def handler(msg: Any) -> None:
            handled.append(msg.subject)
            if len(handled) >= 2:
                done.set()
            if msg.subject == "otaio.bad":
                raise ValueError("refused")
            assert trace.get_current_span().get_span_context().trace_id == int(TRACEPARENT[3:35], 16)

        consumer = await core.jetstream().consume("otaio.>", handler, durable="otaio", workers=1)
        await asyncio.wait_for(done.wait(), 20)
        await consumer.stop()
        await core.close()
        await peer.close()

    asyncio.run(main())
    spans = [s for s in wait_spans(exporter, 2) if s.kind is SpanKind.CONSUMER]
    by_name = {s.name: s for s in spans}
    assert {"process otaio.ok", "process otaio.bad"} <= set(by_name)
    for span in spans:
        assert span.parent is not None and span.parent.span_id == int(TRACEPARENT[36:52], 16)
        assert span.context.trace_id == int(TRACEPARENT[3:35], 16)
        assert span.attributes["messaging.consumer.group.name"] == "otaio"  # type: ignore[index]
    assert by_name["process otaio.bad"].status.status_code is trace.StatusCode.ERROR
    assert by_name["process otaio.ok"].status.status_code is trace.StatusCode.UNSET
