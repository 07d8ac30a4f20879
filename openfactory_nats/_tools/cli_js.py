"""The ``consume`` command: print (and acknowledge) the messages of a JetStream consumer."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from .._blocking.facade import SyncNatsCluster
from .._errors import ConsumerNotFoundError
from .._jetstream.msg import JsMsg

__all__ = ("add_consume_parser", "consume", "format_js_message")

_log = logging.getLogger("openfactory_nats.cli")


class CliError(Exception):
    """A failure reported as one line and a non-zero exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def add_consume_parser(sub: Any, servers: Any) -> None:
    con = sub.add_parser("consume", help="print (and --ack) the messages of a JetStream consumer")
    con.add_argument("--log-level", default="ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    con.add_argument("--timeout", type=float, help="exit 1 when the messages did not come within S s (default: wait)")
    con.add_argument("--servers", type=servers, required=True)
    con.add_argument("--stream", required=True)
    con.add_argument("--durable", required=True, help="the durable consumer (made when missing)")
    con.add_argument("--subject", help="the subject filter of a consumer made here (default: the stream's subject)")
    con.add_argument("--count", type=int, help="exit 0 after this many messages")
    con.add_argument("--ack", action="store_true", help="acknowledge each message once printed")
    con.add_argument("--batch", type=int, default=100, help="messages per fetch (default 100)")


def format_js_message(msg: JsMsg) -> str:
    """Subject, delivery count, then the payload as text when it decodes, else its length."""
    try:
        body = msg.data.decode("utf-8")
        shown = body if body.isprintable() else repr(body)
    except UnicodeDecodeError:
        shown = f"<{len(msg.data)} bytes>"
    meta = msg.metadata
    return f"[{msg.subject}] #{meta.sequence.stream} delivered={meta.num_delivered} {shown}"


def consume(args: argparse.Namespace, options: dict[str, Any]) -> int:
    if args.count is not None and args.count < 1:
        raise CliError("--count must be at least 1", 2)
    if args.batch < 1:
        raise CliError("--batch must be at least 1", 2)
    step = 10.0 if args.timeout is None else args.timeout
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    received = 0
    with SyncNatsCluster("cli", args.servers, _log, timeout=step, connect_timeout=step, **options) as cluster:
        js = cluster.jetstream()
        try:
            sub = js.pull_subscribe_bind(args.durable, args.stream)
        except ConsumerNotFoundError:
            subject = args.subject
            if subject is None:
                subjects = list(js.stream_info(args.stream).config.get("subjects") or [])
                if len(subjects) != 1:
                    raise CliError(f"stream {args.stream!r} has {len(subjects)} subjects: give --subject", 2) from None
                subject = subjects[0]
            sub = js.pull_subscribe(subject, args.durable, args.stream)
        while args.count is None or received < args.count:
            wait = 5.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                raise CliError(f"{received} message(s) from {args.durable!r} within {args.timeout:g} s")
            want = args.batch if args.count is None else min(args.batch, args.count - received)
            for msg in sub.fetch(want, min(wait, 5.0)):
                print(format_js_message(msg), flush=True)
                if args.ack:
                    msg.ack()
                received += 1
        cluster.flush()
    return 0
