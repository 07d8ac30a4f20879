"""The command-line tool, run as a subprocess against real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from .servers import NatsServer, create_stream, free_port, stream_count

CLI = [sys.executable, "-m", "openfactory_nats"]


def run(args: list[str], stdin: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    return subprocess.run(
        CLI + args, input=stdin, capture_output=True, timeout=timeout, env=dict(os.environ, **(env or {}))
    )


def test_stdin_lines_arrive_in_order(server: NatsServer, subscriber_factory: Any) -> None:
    sub = subscriber_factory(server.url, "lines")
    lines = b"".join(b"line %d\n" % i for i in range(1000))
    result = run(["publish", "--servers", server.url, "lines"], stdin=lines)
    assert result.returncode == 0, result.stderr
    got = sub.wait_for(1000)
    assert [m.data for m in got] == [b"line %d" % i for i in range(1000)]


def test_payload_argument_and_headers(server: NatsServer, subscriber_factory: Any) -> None:
    sub = subscriber_factory(server.url, "one")
    result = run(["publish", "--servers", server.url, "--header", "Kind=test", "--headers", "X:1", "one", "hello"])
    assert result.returncode == 0, result.stderr
    (msg,) = sub.wait_for(1)
    assert msg.data == b"hello" and msg.headers == {"Kind": "test", "X": "1"}


def test_unreachable_server_is_a_clean_error() -> None:
    started = time.monotonic()
    result = run(["publish", "--servers", f"nats://127.0.0.1:{free_port()}", "--timeout", "1", "a", "x"])
    assert result.returncode == 1
    assert time.monotonic() - started < 10
    err = result.stderr.decode()
    assert "Traceback" not in err
    assert err.startswith("openfactory-nats: error: ") and "could not connect" in err


def test_bad_subject_is_refused(server: NatsServer) -> None:
    for subject in ("a..b", "a b", "a.*", ""):
        result = run(["publish", "--servers", server.url, subject, "x"])
        assert result.returncode == 2, subject
        err = result.stderr.decode()
        assert "Traceback" not in err and "subject" in err
    assert server.monitor("varz")["in_msgs"] == 0


def test_credentials_come_from_the_environment(subscriber_factory: Any) -> None:
    server = NatsServer(name="auth", extra=["--user", "alice", "--pass", "s3cret"]).start()
    try:
        url = server.url
        ok = run(["publish", "--servers", url, "auth", "x"], env={"NATS_USER": "alice", "NATS_PASSWORD": "s3cret"})
        assert ok.returncode == 0, ok.stderr
        assert server.monitor("varz")["in_msgs"] == 1
        started = time.monotonic()
        bad = run(
            ["publish", "--servers", url, "--log-level", "DEBUG", "auth", "x"],
            env={"NATS_USER": "alice", "NATS_PASSWORD": "wrong-pw"},
        )
        assert bad.returncode == 1 and time.monotonic() - started < 5
        err = bad.stderr.decode()
        assert "Traceback" not in err and "authorization" in err.lower()
        assert "wrong-pw" not in err
    finally:
        server.close()


def test_demo_exits_zero_on_the_embedded_servers() -> None:
    result = run(["demo", "--threads", "3", "--messages", "500"], timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "== one cluster" in out and "== router over 3 clusters" in out
    assert out.count("delivered  1500 of 1500, per-thread order kept, 0 duplicates, 0 on the wrong cluster: OK") == 2
    assert "== receive" in out and out.count("5000 of 5000") == 2 and out.count("per-asset order kept: OK") == 2
    assert "embedded nats-servers on nats://127.0.0.1:" in result.stderr.decode()


def test_demo_routes_over_clusters_from_the_environment(server: NatsServer) -> None:
    other = NatsServer(name="other").start()
    try:
        env = {"NATS_CLUSTER_A": server.url, "NATS_CLUSTER_B": f" {other.url} ,", "HASH_RING_REPLICAS": "64"}
        result = run(["demo", "--from-env", "--threads", "2", "--messages", "300", "--rate", "0"], env=env)
        assert result.returncode == 0, result.stderr
        assert "== router over 2 clusters" in result.stdout.decode()
        counts = [server.monitor("varz")["in_msgs"], other.monitor("varz")["in_msgs"]]
        assert sum(counts) == 600 and min(counts) > 0
    finally:
        other.close()


def test_demo_against_given_servers(server: NatsServer) -> None:
    result = run(["demo", "--servers", server.url, "--threads", "2", "--messages", "200", "--rate", "0"])
    assert result.returncode == 0, result.stderr
    # 400 from the publishing section, 5,000 from the receive section
    assert server.monitor("varz")["in_msgs"] == 400 + 5000


def test_bench_smoke_run() -> None:
    args = ["bench", "--messages", "3000", "--rounds", "1", "--sizes", "128", "--latency-seconds", "0.2", "--no-stall"]
    result = run([*args, "--json"], timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    (row,) = data["throughput"]
    assert row["size"] == 128 and row["plain"] > 0 and row["facade_1_ratio"] > 0 and row["facade_8_ratio"] > 0
    assert data["latency"]["received"] == data["latency"]["expected"] == 2000
    assert data["machine"]["nats_py"]
    receive = data["receive"]
    assert receive["messages"] == 3000 and receive["facade_callback_ratio"] > 0 and receive["facade_iterator_ratio"] > 0
    assert receive["latency"]["received"] == receive["latency"]["expected"] == 2000


def test_ack_stores_every_line_in_the_stream(jetstream_server: NatsServer) -> None:
    create_stream(jetstream_server.url, "CLI", ["cli.>"])
    lines = b"".join(b"%d\n" % i for i in range(50))
    result = run(["publish", "--servers", jetstream_server.url, "--ack", "cli.lines"], stdin=lines)
    assert result.returncode == 0, result.stderr
    assert stream_count(jetstream_server.url, "CLI") == 50
    missing = run(["publish", "--servers", jetstream_server.url, "--ack", "--timeout", "1", "nostream.x", "v"])
    assert missing.returncode == 1 and "no acknowledgement" in missing.stderr.decode()
    assert "Traceback" not in missing.stderr.decode()


def test_sub_prints_messages_and_exits_after_count(server: NatsServer) -> None:
    proc = subprocess.Popen(
        CLI + ["sub", "--servers", server.url, "--count", "3", "--timeout", "20", "cli.>"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not any(
            "cli.>" in c.get("subscriptions_list", []) for c in server.monitor("connz?subs=1")["connections"]
        ):
            assert time.monotonic() < deadline, "the sub command did not subscribe"
            time.sleep(0.05)
        for args in (["cli.a", "hello"], ["--header", "K=v", "cli.b", "x"]):
            assert run(["publish", "--servers", server.url, *args]).returncode == 0
        binary = run(["publish", "--servers", server.url, "cli.c"], stdin=b"\xff\xfe\n")
        assert binary.returncode == 0
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.decode().splitlines() == ["[cli.a] hello", "[cli.b] K=v x", "[cli.c] <2 bytes>"]


def test_sub_exits_1_when_the_timeout_passes_first(server: NatsServer) -> None:
    started = time.monotonic()
    result = run(["sub", "--servers", server.url, "--count", "1", "--timeout", "0.5", "quiet"])
    assert result.returncode == 1 and time.monotonic() - started < 10
    err = result.stderr.decode()
    assert "Traceback" not in err and "within 0.5 s" in err
    bad = run(["sub", "--servers", server.url, "a..b"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr.decode()
