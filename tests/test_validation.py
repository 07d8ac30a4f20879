"""Bad input: refused in the caller's thread, nothing reaches the server, and the
instance keeps working. Valid subjects always round-trip through a real server."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openfactory_nats import SyncClusterRouter, SyncNatsCluster, validate_subject
from openfactory_nats._wire import MAX_SUBJECT_BYTES

from .servers import NatsServer

BAD_SUBJECTS: list[object] = [
    None, 1, 1.5, b"a.b", ["a"], ("a",), {"a": 1},  # not a str
    "", " ", "\t", "a b", " a", "a ", "a\u00a0b", "a\u2028b",  # empty, whitespace (Unicode too)
    "a\r\nPUB x 1", "a\nb", "a\rb", "a\x00b", "a\x1bb", "a\x7fb", "a\x85b",  # control characters
    "a..b", ".a", "a.", ".", "..",  # empty tokens (the server would drop these silently)
    "*", ">", "a.*", "a.>", "*.a", "a.*.b", ">.a",  # wildcard tokens
    "x" * (MAX_SUBJECT_BYTES + 1), "é" * (MAX_SUBJECT_BYTES // 2 + 1),  # over-long
    "a\ud800b",  # not encodable
]  # fmt: skip
BAD_PAYLOADS: list[object] = ["text", "", None, 0, 1.5, [1, 2], {"a": 1}, object()]
BAD_HEADERS: list[object] = [
    {"Bad Key": "v"}, {"": "v"}, {"a:b": "v"}, {"k": "a\r\nb"}, {"k": "a\nX-Injected: 1"}, {"k": "\x00"},
    {"k": 1}, {1: "v"}, {"k": None}, ["k", "v"], "k: v", 42,
]  # fmt: skip
BAD_TIMEOUTS: list[object] = [-1, -0.001, math.nan, math.inf, "1", b"1", None.__class__, [1], True]


def test_the_whole_matrix_is_refused_and_nothing_reaches_the_server(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(server.url, ">")
    tried = 0
    with SyncNatsCluster("C1", [server.url], logger) as cluster:
        cluster.connect()
        router = SyncClusterRouter({"C1": [server.url]}, logger)
        for subject in BAD_SUBJECTS:
            for publish in (
                lambda s: cluster.publish(s, b"x"),
                lambda s: cluster.publish(s, b"x", ack=True),
                lambda s: router.publish("asset", s, b"x"),
            ):
                with pytest.raises((ValueError, TypeError)):
                    publish(subject)
                tried += 1
        for payload in [*BAD_PAYLOADS, b"x" * (cluster.cluster.max_payload + 1)]:
            with pytest.raises((ValueError, TypeError)):
                cluster.publish("ok", payload)  # type: ignore[arg-type]
            tried += 1
        for headers in BAD_HEADERS:
            with pytest.raises((ValueError, TypeError)):
                cluster.publish("ok", b"x", headers=headers)  # type: ignore[arg-type]
            tried += 1
        for timeout in BAD_TIMEOUTS:
            for call in (
                lambda t: cluster.publish("ok", b"x", timeout=t),
                lambda t: cluster.flush(t),
                lambda t: cluster.connect(t),
            ):
                with pytest.raises((ValueError, TypeError)):
                    call(timeout)
                tried += 1
        for msg_id in ("", "a\r\nb", 5):
            with pytest.raises((ValueError, TypeError)):
                cluster.publish("ok", b"x", ack=True, msg_id=msg_id)  # type: ignore[arg-type]
            tried += 1
        assert tried > 150
        assert cluster.stats()["published"] == 0
        cluster.publish("ok", b"still working")
        cluster.flush(5)
        router.close()
    got = sub.settle()
    assert [(m.subject, m.data) for m in got] == [("ok", b"still working")]
    assert server.monitor("varz")["in_msgs"] == 1


_TOKEN = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters=".*>"),
    min_size=1,
    max_size=10,
).filter(lambda t: not any(c.isspace() for c in t) and not any("\x80" <= c <= "\x9f" for c in t))


def test_valid_subjects_round_trip_through_the_server(
    server: NatsServer, logger: logging.Logger, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(server.url, ">")
    with SyncNatsCluster("C1", [server.url], logger) as cluster:
        cluster.connect()

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(st.lists(_TOKEN, min_size=1, max_size=6))
        def round_trip(tokens: list[str]) -> None:
            subject = ".".join(tokens)
            assert validate_subject(subject) == subject
            before = len(sub.messages)
            cluster.publish(subject, b"p")
            cluster.flush(5)
            got = sub.wait_for(before + 1, timeout=5)
            assert got[before].subject == subject

        round_trip()


@given(st.text(max_size=30))
def test_any_text_is_either_valid_or_refused_with_value_error(text: str) -> None:
    try:
        validate_subject(text)
    except ValueError:
        tokens = text.split(".")
        assert (
            not text
            or any(not t or t in ("*", ">") for t in tokens)
            or any(c.isspace() or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF for c in text)
        )
    else:
        assert text and all(t and t not in ("*", ">") for t in text.split("."))
        assert not any(c.isspace() or ord(c) < 0x20 for c in text)
