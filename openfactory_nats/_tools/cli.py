"""The ``openfactory-nats`` command: ``demo``, ``publish``, ``sub``, ``req``, ``reply``,
``services`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from .. import __version__
from .._blocking.facade import SyncNatsCluster
from .._errors import NatsClusterError
from .._message import Msg
from .._receive.discovery import ServiceInstance
from .cli_js import CliError, add_consume_parser, consume
from .cli_kv import add_kv_parser, kv

__all__ = ("main",)

_log = logging.getLogger("openfactory_nats.cli")


def _servers(value: str) -> list[str]:
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if not urls:
        raise argparse.ArgumentTypeError("expected one or more comma-separated URLs")
    return urls


def _header(value: str) -> tuple[str, str]:
    name, sep, val = value.partition("=")
    if not sep:
        name, sep, val = value.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name.strip(), val.strip()


def credentials_from_env(env: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, Any]:
    """nats-py connect options from ``NATS_USER``/``NATS_PASSWORD``, ``NATS_TOKEN`` and
    ``NATS_CREDS``, so that secrets stay out of shell history and process lists."""
    options: dict[str, Any] = {}
    if env.get("NATS_USER"):
        options["user"] = env["NATS_USER"]
        options["password"] = env.get("NATS_PASSWORD", "")
    if env.get("NATS_TOKEN"):
        options["token"] = env["NATS_TOKEN"]
    if env.get("NATS_CREDS"):
        options["user_credentials"] = env["NATS_CREDS"]
    return options


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    common.add_argument("--timeout", type=float, default=10.0, help="seconds for each blocking step (default 10)")
    parser = argparse.ArgumentParser(prog="openfactory-nats", description="Publish to NATS from blocking code.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", parents=[common], help="publish from threads and check every message arrived")
    demo.add_argument("--servers", type=_servers, help="one cluster's URLs (default: embedded nats-servers)")
    demo.add_argument("--from-env", action="store_true", help="route over the NATS_CLUSTER_<NAME> clusters")
    demo.add_argument("--clusters", type=int, default=3, help="embedded servers for the router run (default 3)")
    demo.add_argument("--threads", type=int, default=4)
    demo.add_argument("--messages", type=int, default=2500, help="messages per thread")
    demo.add_argument("--assets", type=int, default=20)
    demo.add_argument("--rate", type=float, default=20_000, help="total msgs/s; 0 for as fast as possible")

    pub = sub.add_parser("publish", parents=[common], help="publish PAYLOAD, or each line of stdin")
    pub.add_argument("--servers", type=_servers, required=True)
    pub.add_argument("--header", "--headers", dest="headers", type=_header, action="append", default=[],
                     metavar="NAME=VALUE", help="a message header (repeatable)")  # fmt: skip
    pub.add_argument("--ack", action="store_true", help="wait for JetStream to store each message (de-duplicated)")
    pub.add_argument("subject")
    pub.add_argument("payload", nargs="?")

    rcv = sub.add_parser("sub", help="print the messages received on SUBJECT")
    rcv.add_argument("--log-level", default="ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    rcv.add_argument("--timeout", type=float, help="exit 1 when the messages did not come within S s (default: wait)")
    rcv.add_argument("--servers", type=_servers, required=True)
    rcv.add_argument("--queue", help="join this queue group")
    rcv.add_argument("--count", type=int, help="exit 0 after this many messages")
    rcv.add_argument("subject")

    req = sub.add_parser("req", help="send a request to SUBJECT and print the reply")
    req.add_argument("--log-level", default="ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    req.add_argument("--timeout", type=float, default=10.0, help="seconds to connect, then to wait for the reply")
    req.add_argument("--servers", type=_servers, required=True)
    req.add_argument("--header", "--headers", dest="headers", type=_header, action="append", default=[],
                     metavar="NAME=VALUE", help="a request header (repeatable)")  # fmt: skip
    req.add_argument("subject")
    req.add_argument("payload", nargs="?", default="")

    rep = sub.add_parser("reply", help="answer the requests sent to SUBJECT")
    rep.add_argument("--log-level", default="ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    rep.add_argument("--timeout", type=float, help="exit 1 when the requests did not come within S s (default: wait)")
    rep.add_argument("--servers", type=_servers, required=True)
    answer = rep.add_mutually_exclusive_group(required=True)
    answer.add_argument("--echo", action="store_true", help="answer with the request's payload")
    answer.add_argument("--text", help="answer with TEXT")
    rep.add_argument("--queue", help="join this queue group")
    rep.add_argument("--count", type=int, help="exit 0 after answering this many requests")
    rep.add_argument("subject")

    add_consume_parser(sub, _servers)
    add_kv_parser(sub, _servers)
    svc = sub.add_parser("services", help="list the running NATS services (ADR-32), their endpoints and stats")
    svc.add_argument("--log-level", default="ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    svc.add_argument("--timeout", type=float, default=1.0, help="seconds to gather the answers (default 1)")
    svc.add_argument("--servers", type=_servers, required=True)
    svc.add_argument("--json", action="store_true", help="print machine-readable results")
    svc.add_argument("name", nargs="?", help="only the instances of this service")

    bench = sub.add_parser("bench", parents=[common], help="measure throughput next to plain nats-py")
    bench.add_argument("--servers", type=_servers, help="a server to measure against (default: embedded)")
    bench.add_argument("--messages", type=int, default=200_000)
    bench.add_argument("--rounds", type=int, default=5, help="alternated rounds per size (medians are quoted)")
    bench.add_argument(
        "--sizes", default="16,128,1024,4096,16384,65536,1048576", help="payload sizes in bytes, comma-separated"
    )
    bench.add_argument("--latency-seconds", type=float, default=3.0)
    bench.add_argument("--no-stall", action="store_true", help="skip the stalled-server memory test")
    bench.add_argument("--no-receive", action="store_true", help="skip the receive measurements")
    bench.add_argument("--no-requests", action="store_true", help="skip the request/reply measurements")
    bench.add_argument("--requests", type=int, default=2000, help="requests per request/reply measurement")
    bench.add_argument("--jetstream", type=int, default=100_000, help="messages consumed from JetStream (0: skip)")
    bench.add_argument("--kv", type=int, default=100_000, help="key-value watch updates (0: skip the KV section)")
    bench.add_argument("--json", action="store_true", help="print machine-readable results")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .embedded import EmbeddedServer

    if args.threads < 1 or args.messages < 1 or args.assets < 1 or args.rate < 0 or args.clusters < 1:
        raise CliError("--threads, --messages, --assets and --clusters must be at least 1, --rate at least 0", 2)
    embedded: list[EmbeddedServer] = []
    runs: list[dict[str, list[str]]] = []
    try:
        if args.servers is not None:
            runs.append({"demo": args.servers})
        elif args.from_env:
            from .._routing.router import clusters_from_env

            runs.append(clusters_from_env()[0])
        else:
            try:
                for i in range(max(1, args.clusters)):
                    embedded.append(EmbeddedServer(f"demo-{i + 1}").start())
            except FileNotFoundError as exc:
                raise CliError(str(exc)) from exc
            listed = ", ".join(s.url for s in embedded)
            print(f"embedded nats-server{'s' if len(embedded) > 1 else ''} on {listed}", file=sys.stderr)
            runs.append({"demo": [embedded[0].url]})
            if len(embedded) > 1:
                runs.append({f"C{i + 1}": [s.url] for i, s in enumerate(embedded)})
        ok = True
        for clusters in runs:
            result = run_demo(
                clusters,
                threads=args.threads,
                messages=args.messages,
                assets=args.assets,
                timeout=args.timeout,
                rate=args.rate,
                options=credentials_from_env(),
                progress=sys.stderr,
            )
            print(result.summary(), flush=True)
            ok = ok and result.ok
        if not args.from_env:
            from .demo_receive import run_receive_demo

            first: list[str] = args.servers if args.servers is not None else [embedded[0].url]
            received, summary = run_receive_demo(first, timeout=args.timeout, options=credentials_from_env())
            print(summary, flush=True)
            ok = ok and received
            from .demo_requests import run_request_demo

            answered, summary = run_request_demo(first, timeout=args.timeout, options=credentials_from_env())
            print(summary, flush=True)
            ok = ok and answered
    finally:
        for server in embedded:
            server.close()
    return 0 if ok else 1


def _publish(args: argparse.Namespace) -> int:
    headers = dict(args.headers) or None
    sent = 0
    last_ack = None
    tty = sys.stderr.isatty()
    with SyncNatsCluster("cli", args.servers, _log, timeout=args.timeout, connect_timeout=args.timeout,
                         **credentials_from_env()) as cluster:  # fmt: skip
        cluster.connect()
        lines = [args.payload.encode()] if args.payload is not None else (ln.rstrip(b"\r\n") for ln in sys.stdin.buffer)
        for payload in lines:
            if args.ack:
                last_ack = cluster.publish(args.subject, payload, headers=headers, ack=True)
            else:
                cluster.publish(args.subject, payload, headers=headers)
            sent += 1
            if tty and sent % 1000 == 0:
                print(f"\rpublished {sent}", end="", file=sys.stderr, flush=True)
        cluster.flush(args.timeout)
    if tty:
        print(f"\rpublished {sent}", file=sys.stderr)
    if last_ack is not None and tty:
        print(f"acknowledged by stream {last_ack.stream}, last sequence {last_ack.seq}", file=sys.stderr)
    return 0


def format_message(msg: Msg) -> str:
    """One message as the ``sub`` command prints it: subject, headers, then the payload
    as text when it decodes, else its length."""
    try:
        body = msg.data.decode("utf-8")
        shown = body if body.isprintable() else repr(body)
    except UnicodeDecodeError:
        shown = f"<{len(msg.data)} bytes>"
    headers = "".join(f" {name}={value}" for name, value in (msg.headers or {}).items())
    return f"[{msg.subject}]{headers} {shown}"


def _received(args: argparse.Namespace, what: str) -> Iterator[tuple[SyncNatsCluster, Msg]]:
    """The messages on ``args.subject`` until ``--count`` of them came (exit 0) or
    ``--timeout`` passed first (exit 1; without it, wait for ever)."""
    if args.count is not None and args.count < 1:
        raise CliError("--count must be at least 1", 2)
    step = 10.0 if args.timeout is None else args.timeout
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    received = 0
    with SyncNatsCluster("cli", args.servers, _log, timeout=step, connect_timeout=step,
                         **credentials_from_env()) as cluster:  # fmt: skip
        sub = cluster.subscribe(args.subject, queue=args.queue)
        while args.count is None or received < args.count:
            wait = 3600.0 if deadline is None else deadline - time.monotonic()
            try:
                msg = sub.next_msg(timeout=max(0.0, wait))
            except TimeoutError:
                if deadline is None:
                    continue
                raise CliError(f"{received} {what}(s) on {args.subject!r} within {args.timeout:g} s") from None
            if what == "request" and msg.reply is None:
                continue  # a plain message: nobody to answer
            yield cluster, msg
            received += 1


def _sub(args: argparse.Namespace) -> int:
    for _, msg in _received(args, "message"):
        print(format_message(msg), flush=True)
    return 0


def _req(args: argparse.Namespace) -> int:
    with SyncNatsCluster("cli", args.servers, _log, timeout=args.timeout, connect_timeout=args.timeout,
                         **credentials_from_env()) as cluster:  # fmt: skip
        reply = cluster.request(args.subject, args.payload.encode(), args.timeout, headers=dict(args.headers) or None)
    print(format_message(reply), flush=True)
    return 0


def _reply(args: argparse.Namespace) -> int:
    # A pull loop rather than serve(): with --count, exactly that many requests are
    # answered, each before the process exits.
    text = None if args.echo else args.text.encode()
    for cluster, msg in _received(args, "request"):
        msg.respond(msg.data if text is None else text)
        print(format_message(msg), flush=True)
        cluster.flush()
    return 0


def _services(args: argparse.Namespace) -> int:
    connect = max(5.0, args.timeout)
    with SyncNatsCluster("cli", args.servers, _log, timeout=connect, connect_timeout=connect,
                         **credentials_from_env()) as cluster:  # fmt: skip
        found = cluster.discover(args.name, timeout=args.timeout)
    if args.json:
        print(json.dumps([instance.as_dict() for instance in found], indent=2))
    elif found:
        print(format_services(found))
    else:
        print("no services found" if args.name is None else f"no instance of {args.name!r} found", file=sys.stderr)
    return 0


def format_services(found: Sequence[ServiceInstance]) -> str:
    """The instances as the ``services`` command prints them: a line each, then a table
    of its endpoints with their stats (as ``nats micro info/stats`` show them)."""
    lines: list[str] = []
    for instance in found:
        meta = "".join(f" {k}={v}" for k, v in sorted(instance.metadata.items()))
        about = f" ({instance.description})" if instance.description else ""
        lines.append(f"{instance.name} {instance.version} id={instance.id}{about}{meta}")
        if instance.started:
            lines.append(f"  started {instance.started}")
        rows = [("ENDPOINT", "SUBJECT", "QUEUE", "REQUESTS", "ERRORS", "AVERAGE", "LAST ERROR")]
        for e in instance.endpoints:
            average = e.get("average_processing_time")
            rows.append(
                (
                    str(e.get("name", "")),
                    str(e.get("subject", "")),
                    str(e.get("queue_group") or "-"),
                    str(e.get("num_requests", "-")),
                    str(e.get("num_errors", "-")),
                    _duration(average) if isinstance(average, int | float) else "-",
                    str(e.get("last_error") or ""),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                  for row in rows]  # fmt: skip
    return "\n".join(lines)


def _duration(nanoseconds: float) -> str:
    for unit, size in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if nanoseconds >= size:
            return f"{nanoseconds / size:.3g}{unit}"
    return f"{nanoseconds:.0f}ns"


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, format_table, run_benchmark

    try:
        sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
    except ValueError:
        raise CliError(f"--sizes must be comma-separated integers, not {args.sizes!r}", 2) from None
    if args.requests < 8:
        raise CliError("--requests must be at least 8", 2)
    config = BenchConfig(
        servers=args.servers,
        messages=args.messages,
        sizes=sizes,
        rounds=args.rounds,
        latency_seconds=args.latency_seconds,
        stall=not args.no_stall,
        receive=not args.no_receive,
        requests=0 if args.no_requests else args.requests,
        jetstream=args.jetstream,
        kv=args.kv,
    )
    results = run_benchmark(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.timeout is not None and args.timeout <= 0:
            raise CliError("--timeout must be positive", 2)
        if args.command == "consume":
            return consume(args, credentials_from_env())
        if args.command == "kv":
            return kv(args, credentials_from_env())
        handler = {
            "demo": _demo,
            "publish": _publish,
            "sub": _sub,
            "req": _req,
            "reply": _reply,
            "services": _services,
            "bench": _bench,
        }
        return handler[args.command](args)
    except CliError as exc:
        print(f"openfactory-nats: error: {exc}", file=sys.stderr)
        return exc.status
    except (ValueError, TypeError) as exc:
        print(f"openfactory-nats: error: {exc}", file=sys.stderr)
        return 2
    except (NatsClusterError, RuntimeError, TimeoutError, OSError) as exc:
        print(f"openfactory-nats: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("openfactory-nats: interrupted", file=sys.stderr)
        return 130
