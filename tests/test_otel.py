"""Tracing with OpenTelemetry (openfactory_nats.otel), against real servers: spans recorded
by opentelemetry-sdk's in-memory exporter, nats-py's own async API on the other side."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import nats
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from openfactory_nats import Msg, NatsCluster, ServiceError, SyncClusterRouter, SyncNatsCluster, _tracing, otel

from .servers import NatsServer

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    """An SDK provider of the test's own (the global one is left alone)."""
    made = TracerProvider()
    try:
        yield made
    finally:
        made.shutdown()


@pytest.fixture
def exporter(provider: TracerProvider) -> Iterator[InMemorySpanExporter]:
    """The spans of *provider*, instrumented."""
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


def one(spans: list[ReadableSpan], kind: SpanKind, name: str | None = None) -> ReadableSpan:
    found = [s for s in spans if s.kind is kind and (name is None or s.name == name)]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def parent_and_child(parent: ReadableSpan, child: ReadableSpan) -> None:
    assert parent.context is not None and child.context is not None and child.parent is not None
    assert child.context.trace_id == parent.context.trace_id
    assert child.parent.span_id == parent.context.span_id


def received(into: list[Msg], event: threading.Event) -> Any:
    def callback(msg: Msg) -> None:
        into.append(msg)
        event.set()

    return callback


def test_a_publish_from_a_thread_and_its_callback_are_one_trace(
    exporter: InMemorySpanExporter, client: SyncNatsCluster
) -> None:
    got: list[Msg] = []
    done = threading.Event()
    sub = client.subscribe("otel.*", received(got, done), queue="workers")
    worker = threading.Thread(target=lambda: client.publish("otel.one", b"hello", headers={"k": "v"}))
    worker.start()
    worker.join(10)
    assert done.wait(10)
    sub.unsubscribe()
    spans = wait_spans(exporter, 2)
    send = one(spans, SpanKind.PRODUCER, "send otel.one")
    process = one(spans, SpanKind.CONSUMER, "process otel.*")
    parent_and_child(send, process)
    assert got[0].headers is not None and got[0].headers["k"] == "v"  # the caller's headers are kept
    assert got[0].headers["traceparent"].split("-")[2] == format(send.context.span_id, "016x")
    attrs = dict(send.attributes or {})
    assert attrs["messaging.system"] == "nats"
    assert attrs["messaging.destination.name"] == "otel.one"
    assert attrs["messaging.operation.type"] == "send"
    assert attrs["messaging.message.body.size"] == 5
    assert attrs["server.address"] == "127.0.0.1" and isinstance(attrs["server.port"], int)
    attrs = dict(process.attributes or {})
    assert attrs["messaging.operation.type"] == "process"
    assert attrs["messaging.destination.name"] == "otel.one"
    assert attrs["messaging.destination.template"] == "otel.*"
    assert attrs["messaging.consumer.group.name"] == "workers"
    assert [link.context.span_id for link in process.links] == [send.context.span_id]


def test_the_producer_span_is_a_child_of_the_callers_span(
    exporter: InMemorySpanExporter, provider: TracerProvider, client: SyncNatsCluster
) -> None:
    with provider.get_tracer("test").start_as_current_span("caller"):
        client.publish("otel.caller", b"x")
    spans = wait_spans(exporter, 2)
    parent_and_child(one(spans, SpanKind.INTERNAL, "caller"), one(spans, SpanKind.PRODUCER))


def test_a_routed_publish_is_one_trace_with_its_callback_on_each_cluster(
    exporter: InMemorySpanExporter, logger: logging.Logger
) -> None:
    servers = [NatsServer(name=f"R{i}").start() for i in range(2)]
    try:
        with SyncClusterRouter({f"R{i}": [s.url] for i, s in enumerate(servers)}, logger) as router:
            keys: dict[str, str] = {}
            for i in range(200):  # one asset for each cluster
                keys.setdefault(router.cluster_for(f"asset-{i}"), f"asset-{i}")
                if len(keys) == 2:
                    break
            got: list[Msg] = []
            lock = threading.Lock()

            def callback(msg: Msg) -> None:
                with lock:
                    got.append(msg)

            sub = router.subscribe_all("routed.>", callback)
            for key in keys.values():
                threading.Thread(target=router.publish, args=(key, f"routed.{key}", b"r")).start()
            spans = wait_spans(exporter, 4)
            sub.unsubscribe()
    finally:
        for srv in servers:
            srv.close()
    assert len(got) == 2
    for key in keys.values():
        send = one(spans, SpanKind.PRODUCER, f"send routed.{key}")
        process = [
            s
            for s in spans
            if s.kind is SpanKind.CONSUMER
            and dict(s.attributes or {}).get("messaging.destination.name") == f"routed.{key}"
        ]
        assert len(process) == 1
        parent_and_child(send, process[0])
    ports = {one(spans, SpanKind.PRODUCER, f"send routed.{k}").attributes["server.port"] for k in keys.values()}  # type: ignore[index]
    assert ports == {s.port for s in servers}


def test_a_request_and_its_serve_handler_are_one_trace(exporter: InMemorySpanExporter, client: SyncNatsCluster) -> None:
    sub = client.serve("otel.echo", lambda msg: msg.data.upper(), queue="echoes")
    assert client.request("otel.echo", b"ping", 5).data == b"PING"
    sub.unsubscribe()
    spans = wait_spans(exporter, 2)
    request = one(spans, SpanKind.CLIENT, "request otel.echo")
    handler = one(spans, SpanKind.SERVER, "process otel.echo")
    parent_and_child(request, handler)
    assert request.attributes["messaging.operation.name"] == "request"  # type: ignore[index]
    assert handler.attributes["messaging.consumer.group.name"] == "echoes"  # type: ignore[index]
    assert request.status.status_code is StatusCode.UNSET and handler.status.status_code is StatusCode.UNSET


def test_a_service_endpoints_error_is_recorded_on_its_span(
    exporter: InMemorySpanExporter, client: SyncNatsCluster
) -> None:
    def fail(msg: Msg) -> bytes:
        raise ServiceError(503, "not today")

    service = client.service("otelsvc", "1.0.0")
    service.endpoint("fail", fail, subject="otel.fail")
    with pytest.raises(ServiceError):
        client.request("otel.fail", b"", 5)
    service.stop()
    spans = wait_spans(exporter, 2)
    handler = one(spans, SpanKind.SERVER, "process otel.fail")
    request = one(spans, SpanKind.CLIENT, "request otel.fail")
    parent_and_child(request, handler)
    assert handler.status.status_code is StatusCode.ERROR
    assert [e.name for e in handler.events] == ["exception"]
    assert handler.attributes["error.type"] == "openfactory_nats._errors.ServiceError"  # type: ignore[index]
    assert request.status.status_code is StatusCode.ERROR  # the requester got a ServiceError


def test_a_callbacks_exception_is_recorded_and_delivery_goes_on(
    exporter: InMemorySpanExporter, client: SyncNatsCluster
) -> None:
    calls: list[Msg] = []
    done = threading.Event()

    def callback(msg: Msg) -> None:
        calls.append(msg)
        if msg.data == b"bad":
            raise ValueError("bad message")
        done.set()

    sub = client.subscribe("otel.err", callback)
    client.publish("otel.err", b"bad")
    client.publish("otel.err", b"good")
    assert done.wait(10)
    assert sub.errors == 1
    sub.unsubscribe()
    spans = wait_spans(exporter, 4)
    bad, good = [s for s in spans if s.kind is SpanKind.CONSUMER]
    assert bad.status.status_code is StatusCode.ERROR and bad.attributes["error.type"] == "ValueError"  # type: ignore[index]
    assert bad.events[0].attributes["exception.message"] == "bad message"  # type: ignore[index]
    assert good.status.status_code is StatusCode.UNSET


def test_a_serve_handlers_exception_is_recorded(exporter: InMemorySpanExporter, client: SyncNatsCluster) -> None:
    def fail(msg: Msg) -> bytes:
        raise RuntimeError("handler broke")

    sub = client.serve("otel.broken", fail)
    with pytest.raises(ServiceError):
        client.request("otel.broken", b"", 5)
    sub.unsubscribe()
    handler = one(wait_spans(exporter, 2), SpanKind.SERVER)
    assert handler.status.status_code is StatusCode.ERROR
    assert handler.attributes["error.type"] == "RuntimeError"  # type: ignore[index]


def test_a_traceparent_from_plain_nats_py_is_continued_by_the_callback(
    exporter: InMemorySpanExporter, client: SyncNatsCluster, server: NatsServer
) -> None:
    got: list[Msg] = []
    done = threading.Event()
    sub = client.subscribe("otel.plain", received(got, done))

    async def publish() -> None:
        nc = await nats.connect(server.url)
        # Go's and others' header names may come capitalised.
        await nc.publish("otel.plain", b"from nats-py", headers={"Traceparent": TRACEPARENT})
        await nc.close()

    asyncio.run(publish())
    assert done.wait(10)
    sub.unsubscribe()
    process = one(wait_spans(exporter, 1), SpanKind.CONSUMER)
    assert process.context is not None and process.parent is not None
    assert format(process.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(process.parent.span_id, "016x") == "b7ad6b7169203331"
    assert process.parent.is_remote


def test_headers_reach_plain_nats_py_with_traceparent_and_a_callers_own_wins(
    exporter: InMemorySpanExporter, client: SyncNatsCluster, subscriber_factory: Any, server: NatsServer
) -> None:
    sub = subscriber_factory(server.url, "otel.out.>")
    client.publish("otel.out.a", b"1", headers={"app": "x"})
    client.publish("otel.out.b", b"2", headers={"traceparent": TRACEPARENT, "tracestate": "k=v"})
    client.publish("otel.out.c", b"3")
    msgs = sorted(sub.wait_for(3), key=lambda m: m.subject)
    assert [m.subject for m in msgs] == ["otel.out.a", "otel.out.b", "otel.out.c"]
    spans = wait_spans(exporter, 3)
    injected = one(spans, SpanKind.PRODUCER, "send otel.out.a")
    assert msgs[0].headers["app"] == "x"
    version, trace_id, span_id, flags = msgs[0].headers["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled (newer SDKs add the random-id flag)
    assert trace_id == format(injected.context.trace_id, "032x")
    assert span_id == format(injected.context.span_id, "016x")
    assert msgs[1].headers == {"traceparent": TRACEPARENT, "tracestate": "k=v"}  # the caller's context wins
    assert "traceparent" in msgs[2].headers


def test_asyncio_publish_request_and_callback(exporter: InMemorySpanExporter, server: NatsServer) -> None:
    async def main() -> None:
        core = NatsCluster("aio", [server.url], logging.getLogger("test.otel"))
        await core.connect()
        got = asyncio.Event()

        async def on_msg(msg: Msg) -> None:
            got.set()

        async def echo(msg: Any) -> None:
            await msg.respond(msg.data)

        nc = await nats.connect(server.url)
        await nc.subscribe("aio.echo", cb=echo)
        await nc.flush()
        sub = await core.subscribe("aio.msg", on_msg)
        await core.publish("aio.msg", b"m")
        await asyncio.wait_for(got.wait(), 10)
        assert (await core.request("aio.echo", b"e", 5)).data == b"e"
        await core.publish("aio.acked", b"a", ack=False)
        await sub.unsubscribe()
        await nc.close()
        await core.close()

    asyncio.run(main())
    spans = wait_spans(exporter, 4)
    parent_and_child(one(spans, SpanKind.PRODUCER, "send aio.msg"), one(spans, SpanKind.CONSUMER, "process aio.msg"))
    assert one(spans, SpanKind.CLIENT, "request aio.echo").status.status_code is StatusCode.UNSET


@pytest.mark.timeout(60)
def test_a_jetstream_consume_handler_continues_an_acked_publish(
    exporter: InMemorySpanExporter, jetstream_server: NatsServer, logger: logging.Logger
) -> None:
    with SyncNatsCluster("js", [jetstream_server.url], logger) as nats_:
        js = nats_.jetstream()
        js.add_stream("OTEL", ["otjs.>"])
        nats_.publish("otjs.a", b"stored", ack=True, msg_id="m-1")
        seen = threading.Event()

        def handler(msg: Any) -> None:
            seen.set()
            raise ValueError("nak it once")

        consumer = js.consume("otjs.>", handler, durable="otelc", workers=1)
        assert seen.wait(10)
        consumer.stop()
    spans = wait_spans(exporter, 2)
    send = one(spans, SpanKind.PRODUCER, "send otjs.a")
    assert send.attributes["messaging.message.id"] == "m-1"  # type: ignore[index]
    process = [s for s in spans if s.kind is SpanKind.CONSUMER]
    assert process
    parent_and_child(send, process[0])
    assert process[0].attributes["messaging.consumer.group.name"] == "otelc"  # type: ignore[index]
    assert process[0].status.status_code is StatusCode.ERROR
    assert not [s for s in spans if s.name.startswith(("send $JS", "request $JS"))]  # its own traffic is not traced


def test_uninstrument_stops_it_all(client: SyncNatsCluster, subscriber_factory: Any, server: NatsServer) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    otel.instrument(tracer_provider=provider)
    otel.instrument(tracer_provider=TracerProvider())  # idempotent: the first one stays
    hook = _tracing.HOOK
    assert hook is not None
    otel.uninstrument()
    otel.uninstrument()
    assert _tracing.HOOK is None
    sub = subscriber_factory(server.url, "otel.off")
    got = threading.Event()
    mine = client.subscribe("otel.off", lambda msg: got.set())
    serving = client.serve("otel.off.echo", lambda msg: msg.data)
    client.publish("otel.off", b"x", headers={"a": "b"})
    assert client.request("otel.off.echo", b"y", 5).data == b"y"
    assert got.wait(10)
    assert sub.wait_for(1)[0].headers == {"a": "b"}
    mine.unsubscribe()
    serving.unsubscribe()
    assert spans.get_finished_spans() == ()
    provider.shutdown()


def test_a_sampler_that_drops_everything_records_and_costs_nothing(
    client: SyncNatsCluster, subscriber_factory: Any, server: NatsServer
) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    otel.instrument(tracer_provider=provider)
    try:
        assert _tracing.HOOK is None  # the hot paths test one attribute and go on
        sub = subscriber_factory(server.url, "otel.dropped")
        client.publish("otel.dropped", b"x")
        assert sub.wait_for(1)[0].headers is None
        assert spans.get_finished_spans() == ()
    finally:
        otel.uninstrument()
        provider.shutdown()


def test_the_global_provider_and_propagator_are_used_by_default(client: SyncNatsCluster) -> None:
    # The global provider can be set once per process: set it in a child process.
    code = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter\n"
        "import logging\n"
        "from openfactory_nats import SyncNatsCluster, otel\n"
        "spans = InMemorySpanExporter(); provider = TracerProvider()\n"
        "provider.add_span_processor(SimpleSpanProcessor(spans)); trace.set_tracer_provider(provider)\n"
        "otel.instrument()\n"
        f"with SyncNatsCluster('g', [{client.cluster.servers[0]!r}], logging.getLogger('g')) as c:\n"
        "    c.publish('otel.global', b'x'); c.flush(5)\n"
        "print([s.name for s in spans.get_finished_spans()])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "['send otel.global']"


def test_the_library_works_without_opentelemetry() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'opentelemetry' or name.startswith('opentelemetry.'):\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import openfactory_nats\n"
        "from openfactory_nats import prometheus\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "try:\n"
        "    import openfactory_nats.otel\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert "pip install 'openfactory-nats[otel]'" in out.stdout


def test_nothing_but_the_otel_module_imports_opentelemetry() -> None:
    code = (
        "import sys, pkgutil, importlib, openfactory_nats\n"
        "for m in pkgutil.walk_packages(openfactory_nats.__path__, 'openfactory_nats.'):\n"
        "    if m.name != 'openfactory_nats.otel':\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_trace_ids_differ_between_unrelated_publishes(exporter: InMemorySpanExporter, client: SyncNatsCluster) -> None:
    for _ in range(3):
        client.publish(f"otel.{uuid.uuid4().hex}", b"x")
    spans = wait_spans(exporter, 3)
    assert len({s.context.trace_id for s in spans}) == 3
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left current in the caller
