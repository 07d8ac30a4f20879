"""What tracing costs a publish: 128 B messages from one thread, side by side.

Modes, each measured in a fresh process (OpenTelemetry's global state stays apart),
alternating over the rounds, against one embedded nats-server:

* ``off``: not instrumented (the default);
* ``always_off``: ``otel.instrument()`` with an SDK provider whose sampler is ALWAYS_OFF;
* ``sampled``: instrumented, every publish recorded: a PRODUCER span each, its context
  injected into the headers, exported by a ``BatchSpanProcessor`` to an exporter that
  drops them (the SDK's own work is counted, not an exporter's I/O);
* ``before`` (with ``--before PATH``): the library as it was without the hook, e.g. a
  ``git archive`` of the commit before tracing, unpacked at PATH.

Each figure is messages/s from the first publish until ``flush`` returned, the median of
the rounds. Run: ``python benchmarks/otel_overhead.py [--rounds 5] [--before PATH]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

PAYLOAD = b"x" * 128
COUNTS = {"before": 200_000, "off": 200_000, "always_off": 200_000, "sampled": 50_000}


def child(mode: str, url: str, count: int) -> None:
    from openfactory_nats import SyncNatsCluster

    if mode in ("always_off", "sampled"):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

        from openfactory_nats import otel

        class Drop(SpanExporter):
            def export(self, spans: Sequence[object]) -> SpanExportResult:  # type: ignore[override]
                return SpanExportResult.SUCCESS

        provider = TracerProvider(sampler=ALWAYS_OFF if mode == "always_off" else ALWAYS_ON)
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        otel.instrument(tracer_provider=provider)
    with SyncNatsCluster("bench", [url], logging.getLogger("otel-bench")) as nats:
        nats.connect()
        for _ in range(2000):  # warm up
            nats.publish("bench.otel", PAYLOAD)
        nats.flush(30)
        publish = nats.publish
        started = time.perf_counter()
        for _ in range(count):
            publish("bench.otel", PAYLOAD)
        nats.flush(60)
        elapsed = time.perf_counter() - started
    print(count / elapsed)


def measure(mode: str, url: str, before: str | None) -> float:
    env = dict(os.environ)
    if mode == "before":
        assert before is not None
        env["PYTHONPATH"] = before
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--url", url, "--count", str(COUNTS[mode])],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", help="a copy of the library without tracing, to compare with")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.url, args.count)
        return
    from openfactory_nats._tools.embedded import EmbeddedServer

    modes = (["before"] if args.before else []) + ["off", "always_off", "sampled"]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    server = EmbeddedServer("otel-bench").start()
    try:
        for _ in range(args.rounds):
            for mode in modes:
                rates[mode].append(measure(mode, server.url, args.before))
    finally:
        server.close()
    base = statistics.median(rates["off"])
    print(f"publish 128 B from 1 thread, medians of {args.rounds} rounds (msgs/s; ratio to off)")
    for mode in modes:
        rate = statistics.median(rates[mode])
        spread = f"{min(rates[mode]):,.0f}-{max(rates[mode]):,.0f}"
        print(f"  {mode:<11} {rate:>11,.0f}  {rate / base:5.3f}x  {1e6 / rate:7.2f} us/msg  (range {spread})")


if __name__ == "__main__":
    main()
