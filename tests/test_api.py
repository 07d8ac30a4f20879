"""The public surface and the pure helpers."""

from __future__ import annotations

import inspect

import pytest
from hypothesis import given
from hypothesis import strategies as st

import openfactory_nats
from openfactory_nats import (
    BufferFullError,
    ClusterTimeoutError,
    ConnectError,
    ConnectTimeoutError,
    InvalidMessageError,
    InvalidTypeError,
    NatsCluster,
    NatsClusterError,
    SyncNatsCluster,
    WrongThreadError,
    validate_subject,
)
from openfactory_nats._redact import redact, redact_url
from openfactory_nats._wire import build_frame, check_timeout


def test_every_public_name_is_exported() -> None:
    public = {name for name in dir(openfactory_nats) if not name.startswith("_")}
    modules = {name for name, obj in vars(openfactory_nats).items() if inspect.ismodule(obj)}
    assert public - modules == set(openfactory_nats.__all__) - {"__version__"}
    for name in openfactory_nats.__all__:
        assert hasattr(openfactory_nats, name)


def test_reference_api_signature() -> None:
    params = inspect.signature(NatsCluster).parameters
    assert list(params)[:4] == ["name", "servers", "logger", "reconnect_time_wait"]
    assert params["reconnect_time_wait"].default == 2
    assert params["connect_timeout"].default == 5.0 and params["drain_timeout"].default == 5.0
    sync = inspect.signature(SyncNatsCluster).parameters
    assert list(sync)[:4] == ["name", "servers", "logger", "reconnect_time_wait"]
    assert sync["timeout"].default == 10.0
    assert list(inspect.signature(SyncNatsCluster.publish).parameters) == [
        "self",
        "subject",
        "payload",
        "timeout",
        "headers",
        "ack",
        "msg_id",
    ]


def test_exception_tree_subclasses_the_builtins() -> None:
    assert issubclass(InvalidMessageError, ValueError) and issubclass(InvalidTypeError, TypeError)
    assert issubclass(ConnectError, RuntimeError) and issubclass(WrongThreadError, RuntimeError)
    assert issubclass(ConnectTimeoutError, RuntimeError) and issubclass(ConnectTimeoutError, TimeoutError)
    assert issubclass(BufferFullError, ClusterTimeoutError) and issubclass(ClusterTimeoutError, TimeoutError)
    for exc in (InvalidMessageError, ConnectError, WrongThreadError, BufferFullError):
        assert issubclass(exc, NatsClusterError)
    err = ConnectError("boom", cluster="C1")
    assert err.cluster == "C1" and str(err) == "boom"


def test_frames_match_the_protocol() -> None:
    assert build_frame("a.b", b"hi", None, 100) == b"PUB a.b 2\r\nhi\r\n"
    frame = build_frame("a", b"xy", {"K": "v"}, 100)
    block = b"NATS/1.0\r\nK: v\r\n\r\n"
    assert frame == b"HPUB a %d %d\r\n%bxy\r\n" % (len(block), len(block) + 2, block)
    assert build_frame("a", memoryview(b"mv"), None, 100) == b"PUB a 2\r\nmv\r\n"


def test_timeouts_are_checked() -> None:
    assert check_timeout(0) == 0.0 and check_timeout(1.5) == 1.5
    for bad in (-1, float("nan"), float("inf"), -0.001):
        with pytest.raises(InvalidMessageError):
            check_timeout(bad)
    for wrong in ("1", None, True, [1]):
        with pytest.raises(InvalidTypeError):
            check_timeout(wrong)


def test_redaction() -> None:
    assert redact_url("nats://alice:secret@h:4222") == "nats://alice:***@h:4222"
    assert redact_url("nats://tok@h:4222") == "nats://***@h:4222"
    assert redact_url("nats://h:4222") == "nats://h:4222"
    assert redact("failed: nats://a:b@h:1 and tls://t0k@x") == "failed: nats://a:***@h:1 and tls://***@x"


_TOKEN_CHARS = st.characters(
    blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters=".*> \t\r\n\x85\xa0\u1680"
)
_TOKEN = st.text(_TOKEN_CHARS, min_size=1, max_size=12).filter(lambda t: not any(c.isspace() for c in t))


@given(st.lists(_TOKEN, min_size=1, max_size=8))
def test_valid_subjects_are_accepted(tokens: list[str]) -> None:
    subject = ".".join(tokens)
    assert validate_subject(subject) == subject
    frame = build_frame(subject, b"p", None, 10)
    assert frame.startswith(b"PUB " + subject.encode() + b" 1\r\n")


@given(st.lists(_TOKEN, min_size=1, max_size=5), st.sampled_from(["", "*", ">", " ", "a b", "\x00", "\n", "\t"]))
def test_invalid_subjects_are_refused(tokens: list[str], bad: str) -> None:
    subject = ".".join([*tokens, bad])
    with pytest.raises(InvalidMessageError):
        validate_subject(subject)
