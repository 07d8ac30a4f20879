"""The command-line tool, run as a subprocess against real servers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

from openfactory_nats import Msg, SyncNatsCluster

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
    assert "== request/reply\nrequests   1000 from 4 threads to serve(workers=4): p50 " in out
    assert "0 failed: OK" in out
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
    # 400 from the publishing section, 5,000 from the receive section, and 2 x 1,000 from
    # the request/reply section: the server counts each request and each reply it received
    assert server.monitor("varz")["in_msgs"] == 400 + 5000 + 2 * 1000
    assert "0 failed: OK" in result.stdout.decode()


def test_bench_smoke_run() -> None:
    args = ["bench", "--messages", "3000", "--rounds", "1", "--sizes", "128", "--latency-seconds", "0.2", "--no-stall",
            "--requests", "80", "--jetstream", "1000", "--kv", "500"]  # fmt: skip
    result = run([*args, "--json"], timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    (row,) = data["throughput"]
    assert row["size"] == 128 and row["plain"] > 0 and row["facade_1_ratio"] > 0 and row["facade_8_ratio"] > 0
    assert row["raw"] > 0 and row["raw_ratio"] > 0  # the raw-socket ceiling, delivery checked like the others
    assert data["latency"]["received"] == data["latency"]["expected"] == 2000
    assert data["kv"]["updates"] == 500 and data["kv"]["watch_ratio"] > 0 and data["kv"]["put_ratio"] > 0
    assert data["machine"]["nats_py"]
    receive = data["receive"]
    assert receive["messages"] == 3000 and receive["facade_callback_ratio"] > 0 and receive["facade_iterator_ratio"] > 0
    assert receive["latency"]["received"] == receive["latency"]["expected"] == 2000
    requests = data["requests"]
    assert requests["requests"] == 80 and requests["threads"] == 8 and requests["workers"] == 4
    for key in ("plain_sequential_p50_ms", "facade_sequential_p99_ms", "plain_threads", "facade_serve"):
        assert requests[key] > 0, key
    assert requests["sequential_p50_ratio"] > 0 and requests["threads_ratio"] > 0 and requests["serve_ratio"] > 0
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:  # the same on one CPU
        assert requests["one_cpu_ratio"] > 0
        assert requests["handoff_across_cpus_us"] > 0 and requests["handoff_one_cpu_us"] > 0
    jetstream = data["jetstream"]
    assert jetstream["messages"] == 1000 and jetstream["plain"] > 0
    assert jetstream["fetch_1_ratio"] > 0 and jetstream["consume_4_ratio"] > 0
    table = run([*args, "--no-receive", "--latency-seconds", "0"], timeout=120)
    assert table.returncode == 0, table.stderr
    out = table.stdout.decode()
    assert "request/reply 128 B x 80" in out and "serve(workers=4)" in out and "raw socket" in out
    assert "consume(workers=4)" in out
    skipped = run(
        [*args, "--no-receive", "--latency-seconds", "0", "--no-requests", "--jetstream", "0", "--json"], timeout=120
    )
    assert skipped.returncode == 0, skipped.stderr
    assert "requests" not in json.loads(skipped.stdout) and "jetstream" not in json.loads(skipped.stdout)


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


def _wait_for_subscription(server: NatsServer, subject: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while not any(subject in c.get("subscriptions_list", []) for c in server.monitor("connz?subs=1")["connections"]):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"nothing subscribed to {subject!r}"
        time.sleep(0.05)


def test_req_prints_the_reply_of_the_reply_command(server: NatsServer) -> None:
    echo = subprocess.Popen(
        CLI + ["reply", "--servers", server.url, "--echo", "--count", "2", "--timeout", "30", "svc.echo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    text = subprocess.Popen(
        CLI + ["reply", "--servers", server.url, "--text", "fixed answer", "--queue", "q", "--count", "1", "svc.text"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_subscription(server, "svc.echo", echo)
        _wait_for_subscription(server, "svc.text", text)
        first = run(["req", "--servers", server.url, "svc.echo", "hello"])
        assert first.returncode == 0, first.stderr
        assert first.stdout.decode().startswith("[_INBOX.") and first.stdout.decode().endswith("] hello\n")
        second = run(["req", "--servers", server.url, "--header", "K=v", "--timeout", "5", "svc.echo", "again"])
        assert second.returncode == 0, second.stderr
        assert second.stdout.decode().endswith("] again\n")
        answered = run(["req", "--servers", server.url, "svc.text", "anything"])
        assert answered.returncode == 0, answered.stderr
        assert answered.stdout.decode().endswith("] fixed answer\n")
        out, err = echo.communicate(timeout=20)
        assert echo.returncode == 0, err
        assert out.decode().splitlines() == ["[svc.echo] hello", "[svc.echo] K=v again"]
        out, err = text.communicate(timeout=20)
        assert text.returncode == 0, err
        assert out.decode().splitlines() == ["[svc.text] anything"]
    finally:
        echo.kill()
        text.kill()
        echo.wait(5)
        text.wait(5)
    # the two command processes are gone: nobody answers any more
    gone = run(["req", "--servers", server.url, "svc.echo", "late"])
    assert gone.returncode == 1


def test_req_failures_are_one_line_and_status_1(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    def check(result: Any, status: int, *words: str) -> None:
        err = result.stderr.decode()
        assert result.returncode == status, err
        assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("openfactory-nats: error: "), err
        assert result.stdout == b""
        for word in words:
            assert word in err, (word, err)

    started = time.monotonic()
    check(run(["req", "--servers", server.url, "--timeout", "30", "nobody.home", "x"]), 1, "no responders")
    assert time.monotonic() - started < 10  # at once, not after the 30 s timeout

    subscriber_factory(server.url, "silent")  # receives the request, never answers
    started = time.monotonic()
    check(run(["req", "--servers", server.url, "--timeout", "0.5", "silent", "x"]), 1, "no reply", "0.5 s")
    assert time.monotonic() - started < 10

    def broken(msg: Msg) -> bytes:
        raise KeyError("sensor 7 unknown")

    with SyncNatsCluster("svc", [server.url], logger) as service:
        service.serve("broken", broken)
        check(run(["req", "--servers", server.url, "broken"]), 1, "(500)", "KeyError", "sensor 7 unknown")

    for subject in ("a..b", "a.*", "a.>", "a b"):
        check(run(["req", "--servers", server.url, subject, "x"]), 2, "subject")
    bad = run(["reply", "--servers", server.url, "--echo", "--count", "0", "x"])
    assert bad.returncode == 2 and "--count" in bad.stderr.decode()
    both = run(["reply", "--servers", server.url, "--echo", "--text", "t", "x"])
    assert both.returncode == 2 and "not allowed with" in both.stderr.decode()


def test_reply_exits_1_when_the_requests_did_not_come(server: NatsServer) -> None:
    started = time.monotonic()
    result = run(["reply", "--servers", server.url, "--echo", "--count", "1", "--timeout", "0.5", "quiet"])
    assert result.returncode == 1 and time.monotonic() - started < 10
    err = result.stderr.decode()
    assert "Traceback" not in err and "0 request(s) on 'quiet' within 0.5 s" in err


def test_version_prints_the_package_version() -> None:
    import openfactory_nats

    result = run(["--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split() == ["openfactory-nats", openfactory_nats.__version__]
