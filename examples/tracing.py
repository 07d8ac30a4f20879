"""Tracing with OpenTelemetry: spans printed to the console (README: Tracing).

pip install 'openfactory-nats[otel]' opentelemetry-sdk
NATS_URL=nats://127.0.0.1:4222 python examples/tracing.py
"""

from __future__ import annotations

import logging
import os
import threading

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from openfactory_nats import SyncNatsCluster, otel

provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
trace.set_tracer_provider(provider)
otel.instrument()  # every cluster of the process, from now on

with SyncNatsCluster("C1", [os.environ.get("NATS_URL", "nats://127.0.0.1:4222")], logging.getLogger("app")) as nats:
    arrived = threading.Event()
    nats.subscribe("assets.*.Availability", lambda msg: arrived.set())
    nats.serve("assets.echo", lambda msg: msg.data.upper())
    nats.publish("assets.4a9f0c2e.Availability", b"AVAILABLE")  # "send ...", then "process ..."
    arrived.wait(5)
    print(nats.request("assets.echo", b"hello", timeout=5).data)  # "request ...", then "process ..."
provider.shutdown()
