"""The ``kv`` command: get, put, delete and watch the keys of a key-value bucket."""

from __future__ import annotations

import argparse
import logging
import queue
import sys
import time
from typing import Any

from .._blocking.facade import SyncNatsCluster
from .._errors import KeyNotFoundError
from .._jetstream.kv import Entry
from .cli_js import CliError

__all__ = ("add_kv_parser", "format_entry", "kv")

_log = logging.getLogger("openfactory_nats.cli")


def add_kv_parser(sub: Any, servers: Any) -> None:
    p = sub.add_parser("kv", help="get, put, del or watch the keys of a key-value bucket")
    p.add_argument("--log-level", default="ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--timeout", type=float, help="seconds for each call (watch: exit 1 when --count did not come)")
    p.add_argument("--servers", type=servers, required=True)
    p.add_argument("--count", type=int, help="watch: exit 0 after this many entries")
    p.add_argument("--history", action="store_true", help="watch: every revision kept, not only the current ones")
    p.add_argument("action", choices=["get", "put", "del", "watch"])
    p.add_argument("bucket")
    p.add_argument("key", nargs="?", help="the key (watch: a filter, default '>')")
    p.add_argument("value", nargs="?", help="put: the value (default: stdin)")


def _text(data: bytes) -> str:
    try:
        body = data.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(data)} bytes>"
    return body if body.isprintable() else repr(body)


def format_entry(entry: Entry) -> str:
    """Key, revision, operation, then the value as text when it decodes."""
    return f"[{entry.key}] #{entry.revision} {entry.operation} {_text(entry.value)}".rstrip()


def kv(args: argparse.Namespace, options: dict[str, Any]) -> int:
    if args.action != "watch" and args.key is None:
        raise CliError(f"kv {args.action} needs a KEY", 2)
    if args.value is not None and args.action != "put":
        raise CliError(f"kv {args.action} takes no VALUE", 2)
    if args.count is not None and args.count < 1:
        raise CliError("--count must be at least 1", 2)
    step = 10.0 if args.timeout is None else args.timeout
    with SyncNatsCluster("cli", args.servers, _log, timeout=step, connect_timeout=step, **options) as cluster:
        bucket = cluster.jetstream().key_value(args.bucket)
        if args.action == "get":
            try:
                entry = bucket.get(args.key)
            except KeyNotFoundError as exc:
                raise CliError(str(exc)) from None
            sys.stdout.buffer.write(entry.value + b"\n")
            return 0
        if args.action == "put":
            value = args.value.encode() if args.value is not None else sys.stdin.buffer.read()
            print(bucket.put(args.key, value))
            return 0
        if args.action == "del":
            print(bucket.delete(args.key))
            return 0
        entries: queue.SimpleQueue[Entry] = queue.SimpleQueue()
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        received = 0
        with bucket.watch(args.key or ">", entries.put, include_history=args.history):
            while args.count is None or received < args.count:
                wait = 5.0 if deadline is None else deadline - time.monotonic()
                if wait <= 0:
                    raise CliError(f"{received} entr(ies) within {args.timeout:g} s")
                try:
                    entry = entries.get(timeout=min(wait, 5.0))
                except queue.Empty:
                    continue
                print(format_entry(entry), flush=True)
                received += 1
        return 0
