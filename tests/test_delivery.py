"""The thread side of subscriptions: Msg, subject filters, Inbox and Dispatcher (no server)."""

from __future__ import annotations

import copy
import logging
import pickle
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from openfactory_nats._errors import (
    ClusterClosedError,
    ClusterTimeoutError,
    ClusterUnavailableError,
    InvalidMessageError,
    InvalidTypeError,
    NatsClusterError,
)
from openfactory_nats._filters import subject_matches, validate_filter, validate_queue
from openfactory_nats._message import Msg
from openfactory_nats._receive.dispatcher import Dispatcher
from openfactory_nats._receive.inbox import Inbox, SubscriptionClosedError, SubscriptionModeError

WAIT = 10.0  # upper bound for anything that should happen quickly


def msgs(count: int, subject: str = "s", start: int = 0) -> list[Msg]:
    return [Msg(subject, b"%d" % i) for i in range(start, start + count)]


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


@pytest.fixture
def dispatcher() -> Iterator[Dispatcher]:
    d = Dispatcher(4, name="test-dispatcher")
    try:
        yield d
    finally:
        assert d.close(WAIT)


# -- Msg ---------------------------------------------------------------------------------
def test_msg_is_immutable() -> None:
    headers = {"k": "v"}
    m = Msg("a.b", b"payload", headers, "_INBOX.1")
    headers["k"] = "changed"
    assert m.headers == {"k": "v"}
    for name in ("subject", "data", "headers", "reply"):
        with pytest.raises(AttributeError):
            setattr(m, name, None)
        with pytest.raises(AttributeError):
            delattr(m, name)
    with pytest.raises(AttributeError):
        m.other = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        m.headers["k"] = "x"  # type: ignore[index]
    assert copy.copy(m) is m and copy.deepcopy(m) is m


def test_msg_equality_hash_repr_size() -> None:
    a = Msg("a.b", b"xyz", {"k": "v"}, "r", responder=lambda s, d, h: None)
    b = Msg("a.b", b"xyz", {"k": "v"}, "r")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Msg("a.b", b"xyz", {"k": "w"}, "r")
    assert a != Msg("a.b", b"xyz", {"k": "v"})
    assert Msg("a", b"", {}, "") == Msg("a", b"") and Msg("a", b"", {}).headers is None
    assert Msg("a", b"").reply is None
    assert repr(Msg("sub.j", b"secret payload", reply="r.1")) == "<Msg subject='sub.j' reply='r.1' data=14 bytes>"
    assert b.size == 3 + 3 + 1 + (1 + 1 + 4)
    assert pickle.loads(pickle.dumps(a)) == a


def test_respond() -> None:
    calls: list[tuple[str, bytes, object]] = []
    m = Msg("svc", b"q", reply="_INBOX.x", responder=lambda s, d, h: calls.append((s, d, h)))
    m.respond(b"answer")
    m.respond(b"more", headers={"h": "1"})
    assert calls == [("_INBOX.x", b"answer", None), ("_INBOX.x", b"more", {"h": "1"})]

    no_reply = Msg("svc", b"q", responder=lambda s, d, h: calls.append((s, d, h)))
    with pytest.raises(InvalidMessageError, match="no reply subject") as info:
        no_reply.respond(b"x")
    assert isinstance(info.value, ValueError)
    with pytest.raises(ClusterUnavailableError, match="not received from a cluster"):
        Msg("svc", b"q", reply="r").respond(b"x")
    assert len(calls) == 2


def test_respond_is_thread_safe_as_the_responder_is() -> None:
    lock = threading.Lock()
    seen: list[bytes] = []

    def responder(subject: str, data: bytes, headers: object) -> None:
        with lock:
            seen.append(data)

    m = Msg("svc", b"q", reply="r", responder=responder)

    def respond_many(i: int) -> None:
        for _ in range(100):
            m.respond(b"%d" % i)

    threads = [threading.Thread(target=respond_many, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(seen) == 800


# -- filters -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "subject",
    ["a", "a.b.c", "*", ">", "a.*", "a.>", "*.b.>", "a.*.*.d", "é.ü.日本", "a-b_c.$JS.API", "x" * 4000],
)
def test_filter_accepted(subject: str) -> None:
    assert validate_filter(subject) == subject


@pytest.mark.parametrize(
    ("subject", "problem"),
    [
        ("", "empty"),
        ("a..b", "empty token"),
        (".a", "empty token"),
        ("a.", "empty token"),
        (".", "empty token"),
        ("a b", "whitespace"),
        ("a\u00a0b", "whitespace"),
        ("a\u2003b", "whitespace"),
        ("a\tb", "control character"),
        ("a\r\nb", "control character"),
        ("a\x00b", "control character"),
        ("a\x7fb", "control character"),
        ("a\x85b", "control character"),
        ("a*", "'\\*' must be a whole token"),
        ("a.b*.c", "'\\*' must be a whole token"),
        ("a.>.c", "'>' must be the whole last token"),
        ("a.b>", "'>' must be the whole last token"),
        (">.>", "'>' must be the whole last token"),
        ("x" * 4001, "longer than 4000 bytes"),
        ("é" * 2001, "longer than 4000 bytes"),
        ("a\ud800", "not encodable"),
    ],
)
def test_filter_rejected(subject: str, problem: str) -> None:
    with pytest.raises(InvalidMessageError, match=problem):
        validate_filter(subject)


@pytest.mark.parametrize("value", [None, b"a.b", 1, ["a"]])
def test_filter_type(value: object) -> None:
    with pytest.raises(InvalidTypeError, match="subject must be str"):
        validate_filter(value)


@pytest.mark.parametrize("queue", [None, "workers", "a.b", "a*", "*", ">", "a..b", "é日本", "q:1", "x" * 4000])
def test_queue_accepted(queue: str | None) -> None:
    assert validate_queue(queue) == queue


@pytest.mark.parametrize(
    ("queue", "problem"),
    [
        ("", "must not be empty"),
        ("a b", "whitespace"),
        ("a\u3000b", "whitespace"),
        ("a\nb", "control character"),
        ("a\x00b", "control character"),
        ("a\x9fb", "control character"),
        ("x" * 4001, "longer than 4000"),
        ("\udfff", "not encodable"),
    ],
)
def test_queue_rejected(queue: str, problem: str) -> None:
    with pytest.raises(InvalidMessageError, match=problem):
        validate_queue(queue)


def test_queue_type() -> None:
    with pytest.raises(InvalidTypeError, match="queue must be str or None"):
        validate_queue(b"q")


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*", "a", False),
        ("*.b", "a.b", True),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "a", False),
        (">", "a", True),
        (">", "a.b.c", True),
        ("*", "a.b", False),
        ("a.*.c.>", "a.x.c.d.e", True),
        ("a.*.c.>", "a.x.d.d", False),
        ("a.*.c", "a.x.c.d", False),
    ],
)
def test_subject_matches(pattern: str, subject: str, expected: bool) -> None:
    assert subject_matches(pattern, subject) is expected


# -- Inbox: pull mode --------------------------------------------------------------------
def test_next_msg_timeout(logger: logging.Logger) -> None:
    inbox = Inbox("c", "s", logger)
    started = time.monotonic()
    with pytest.raises(ClusterTimeoutError, match="no message on 's' within 0.05 s") as info:
        inbox.next_msg(0.05)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, NatsClusterError)
    assert 0.04 <= time.monotonic() - started < WAIT
    with pytest.raises(ClusterTimeoutError):
        inbox.next_msg(0)
    with pytest.raises(InvalidMessageError):
        inbox.next_msg(-1)


def test_pull_in_order_and_counted(logger: logging.Logger) -> None:
    inbox = Inbox("c", "s", logger)
    inbox.offer(msgs(3))
    assert inbox.pending == 3 and inbox.pending_bytes == 3 * 2
    assert [inbox.next_msg(0).data for _ in range(3)] == [b"0", b"1", b"2"]
    assert inbox.pending == 0 and inbox.pending_bytes == 0 and inbox.delivered == 3


def test_next_msg_wakes_on_offer(logger: logging.Logger) -> None:
    inbox = Inbox("c", "s", logger)
    timer = threading.Timer(0.05, inbox.offer, [msgs(1)])
    timer.start()
    assert inbox.next_msg(WAIT).data == b"0"
    timer.join()


def test_concurrent_readers_get_each_message_once(logger: logging.Logger) -> None:
    inbox = Inbox("c", "s", logger, max_msgs=1_000_000)
    got: list[list[bytes]] = [[] for _ in range(4)]
    readers = [threading.Thread(target=lambda out=out: out.extend(m.data for m in inbox)) for out in got]
    for r in readers:
        r.start()
    for i in range(0, 20_000, 100):
        inbox.offer(msgs(100, start=i))
    inbox.close(drain=True)
    for r in readers:
        r.join(WAIT)
    assert not any(r.is_alive() for r in readers)
    assert sorted(int(d) for out in got for d in out) == list(range(20_000))
    for out in got:  # each reader sees its share in order
        assert [int(d) for d in out] == sorted(int(d) for d in out)


def test_iterator_ends_on_close(logger: logging.Logger) -> None:
    inbox = Inbox("c", "s", logger)
    seen: list[bytes] = []
    reader = threading.Thread(target=lambda: seen.extend(m.data for m in inbox))
    reader.start()
    inbox.offer(msgs(2))
    wait_until(lambda: len(seen) == 2)
    assert inbox.close() is True
    reader.join(WAIT)
    assert not reader.is_alive() and seen == [b"0", b"1"]
    with pytest.raises(SubscriptionClosedError, match="subscription 's' is closed") as info:
        inbox.next_msg(0)
    assert isinstance(info.value, ClusterClosedError) and info.value.subject == "s" and info.value.cluster == "c"


def test_pull_drain_keeps_pending_readable(logger: logging.Logger) -> None:
    inbox = Inbox("c", "s", logger)
    inbox.offer(msgs(3))
    assert inbox.close(drain=True) is True and inbox.closed
    inbox.offer(msgs(2))  # refused: the subscription is gone
    assert [m.data for m in inbox] == [b"0", b"1", b"2"]
    assert inbox.discarded == 2 and inbox.dropped == 0
    with pytest.raises(SubscriptionClosedError):
        inbox.next_msg(0)


def test_pull_close_without_drain_discards(logger: logging.Logger) -> None:
    inbox = Inbox("c", "s", logger)
    inbox.offer(msgs(5))
    inbox.close(drain=False)
    assert inbox.pending == 0 and inbox.pending_bytes == 0 and inbox.discarded == 5
    assert list(inbox) == []
    inbox.close(drain=True)  # idempotent; cannot undo the discard
    assert inbox.discarded == 5


def test_pull_limits_drop_and_warn_once(logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    inbox = Inbox("c", "lim", logger, max_msgs=10, max_bytes=1000)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for i in range(5):
            inbox.offer(msgs(4, start=i * 4))
        inbox.offer([Msg("lim", b"x" * 2000)])  # larger than max_bytes: never fits
    assert inbox.pending == 10 and inbox.dropped == 11
    assert inbox.next_msg(0).data == b"0"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "subscription 'lim' is too slow: 2 message(s) dropped" in warnings[0].getMessage()
    assert warnings[0].args and warnings[0].msg.count("%") >= 3  # %-style arguments
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=logger.name):
        inbox.close()  # the drops not yet reported are, at the end
    assert "9 message(s) dropped since the last report (11 in all" in caplog.text


def test_byte_limit(logger: logging.Logger) -> None:
    inbox = Inbox("c", "s", logger, max_bytes=100)
    inbox.offer([Msg("s", b"x" * 39)] * 3)  # 40 bytes each: two fit
    assert inbox.pending == 2 and inbox.pending_bytes == 80 and inbox.dropped == 1
    inbox.next_msg(0)
    inbox.offer([Msg("s", b"x" * 60), Msg("s", b"y" * 9)])  # 61 does not fit, 10 does
    assert inbox.pending == 2 and inbox.pending_bytes == 50 and inbox.dropped == 2


def test_check_thread_guards_blocking_calls(logger: logging.Logger) -> None:
    def refuse() -> None:
        raise RuntimeError("This method cannot be called from the event loop thread")

    inbox = Inbox("c", "s", logger, check_thread=refuse)
    inbox.offer(msgs(1))
    with pytest.raises(RuntimeError, match="event loop thread"):
        inbox.next_msg(0)
    with pytest.raises(RuntimeError, match="event loop thread"):
        next(iter(inbox))


# -- Inbox: callbacks --------------------------------------------------------------------
def test_order_under_shared_dispatcher_and_thread_bound(logger: logging.Logger) -> None:
    baseline = threading.active_count()
    peak = baseline
    with Dispatcher(4) as d:
        count, per_inbox = 1000, 50
        received: list[list[int]] = [[] for _ in range(count)]
        busy = [False] * count
        overlaps: list[int] = []
        finished = threading.Semaphore(0)

        def make(i: int) -> Callable[[Msg], None]:
            def on_msg(m: Msg) -> None:
                if busy[i]:
                    overlaps.append(i)
                busy[i] = True
                received[i].append(int(m.data))
                if int(m.data) % 7 == 0:
                    time.sleep(0)  # let another worker try to take this inbox meanwhile
                busy[i] = False
                if len(received[i]) == per_inbox:
                    finished.release()

            return on_msg

        inboxes = [Inbox("c", f"s.{i}", logger, callback=make(i), dispatcher=d) for i in range(count)]
        for start in range(0, per_inbox, 5):
            for inbox in inboxes:
                inbox.offer(msgs(5, start=start))
            peak = max(peak, threading.active_count())
        for _ in range(count):
            assert finished.acquire(timeout=WAIT)
            peak = max(peak, threading.active_count())
        assert not overlaps
        assert all(r == list(range(per_inbox)) for r in received)
        assert sum(i.delivered for i in inboxes) == count * per_inbox
        for inbox in inboxes:
            assert inbox.close(timeout=WAIT)
    assert peak - baseline <= 5
    wait_until(lambda: threading.active_count() == baseline)


def test_slow_callback_drops_while_neighbour_gets_everything(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture, dispatcher: Dispatcher
) -> None:
    entered, release = threading.Event(), threading.Event()
    slow_seen: list[bytes] = []
    fast_seen: list[bytes] = []

    def slow(m: Msg) -> None:
        entered.set()
        release.wait(WAIT)
        slow_seen.append(m.data)

    slow_inbox = Inbox("c", "slow", logger, callback=slow, dispatcher=dispatcher, max_msgs=10)
    fast_inbox = Inbox("c", "fast", logger, callback=lambda m: fast_seen.append(m.data), dispatcher=dispatcher)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        slow_inbox.offer(msgs(1))
        assert entered.wait(WAIT)
        for i in range(5):
            slow_inbox.offer(msgs(20, start=1 + i * 20))
            fast_inbox.offer(msgs(200, start=i * 200))
        wait_until(lambda: len(fast_seen) == 1000)
    assert fast_seen == [b"%d" % i for i in range(1000)]
    assert slow_inbox.pending == 10 and slow_inbox.dropped == 90
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "subscription 'slow' is too slow" in warnings[0].getMessage()
    release.set()
    assert slow_inbox.close(drain=True, timeout=WAIT)
    assert slow_seen == [b"%d" % i for i in range(11)]
    assert fast_inbox.close(timeout=WAIT)


def test_callback_exception_logged_and_delivery_goes_on(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[bytes] = []

    def on_msg(m: Msg) -> None:
        if m.data == b"1":
            raise ValueError("boom")
        if m.data == b"3":
            raise SystemExit(3)  # must not end the worker either
        seen.append(m.data)

    with caplog.at_level(logging.ERROR, logger=logger.name):
        inbox = Inbox("clu", "subj.>", logger, callback=on_msg)
        inbox.offer(msgs(5, subject="subj.x"))
        wait_until(lambda: inbox.delivered == 5 and len(seen) == 3)
        assert inbox.close(drain=True, timeout=WAIT)
    assert seen == [b"0", b"2", b"4"] and inbox.errors == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert errors[0].args == ("clu", "subj.>", "subj.x")
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is ValueError
    assert "Traceback" in caplog.text and "boom" in caplog.text


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("drain", [False, True])
def test_callback_closes_its_own_inbox(logger: logging.Logger, shared: bool, drain: bool) -> None:
    baseline = threading.active_count()
    d = Dispatcher(2) if shared else None
    seen: list[bytes] = []
    results: list[bool] = []
    holder: list[Inbox] = []

    def on_msg(m: Msg) -> None:
        seen.append(m.data)
        if m.data == b"2":
            results.append(holder[0].close(drain=drain, timeout=WAIT))

    inbox = Inbox("c", "own", logger, callback=on_msg, dispatcher=d)
    holder.append(inbox)
    inbox.offer(msgs(10))
    wait_until(lambda: bool(results))
    assert results == [False]  # did not wait for itself
    assert inbox.close(timeout=WAIT)  # returns once the worker has finished with it
    if drain:
        assert len(seen) == 10 and inbox.discarded == 0
    else:
        assert seen == [b"0", b"1", b"2"] and inbox.discarded == 7
    if d is not None:
        assert d.close(WAIT)
    assert threading.active_count() == baseline


def test_callback_closes_other_inboxes_and_dispatcher(logger: logging.Logger) -> None:
    d = Dispatcher(1)
    other = Inbox("c", "other", logger, callback=lambda m: None, dispatcher=d)
    outcome: list[object] = []

    def on_msg(m: Msg) -> None:
        other.offer(msgs(3))
        # Same dispatcher, one thread: waiting for `other` here would wait for ourselves.
        outcome.append(other.close(drain=True, timeout=WAIT))
        outcome.append(d.close(WAIT))  # closes `other` for good, and ends this thread afterwards

    started = time.monotonic()
    first = Inbox("c", "first", logger, callback=on_msg, dispatcher=d)
    first.offer(msgs(1))
    wait_until(lambda: len(outcome) == 2)
    assert time.monotonic() - started < WAIT / 2
    assert outcome == [False, True]
    assert d.close(WAIT) and first.close(timeout=WAIT) and other.close(timeout=WAIT)
    assert other.delivered == 0 and other.discarded == 3 and first.delivered == 1
    with pytest.raises(ClusterClosedError, match="dispatcher .* is closed"):
        Inbox("c", "late", logger, callback=lambda m: None, dispatcher=d)


def test_blocking_callback_delays_only_its_own_inbox(logger: logging.Logger, dispatcher: Dispatcher) -> None:
    release = threading.Event()
    blocked = Inbox("c", "blocked", logger, callback=lambda m: release.wait(WAIT), dispatcher=dispatcher)
    seen: list[Msg] = []
    others = [Inbox("c", f"o{i}", logger, callback=seen.append, dispatcher=dispatcher) for i in range(10)]
    blocked.offer(msgs(5))
    for inbox in others:
        inbox.offer(msgs(10))
    wait_until(lambda: len(seen) == 100)
    assert blocked.pending == 4
    release.set()
    for inbox in [blocked, *others]:
        assert inbox.close(drain=True, timeout=WAIT)
    assert blocked.delivered == 5


def test_fairness_on_one_thread(logger: logging.Logger) -> None:
    order: list[str] = []
    go = threading.Event()

    def on_busy(m: Msg) -> None:
        go.wait(WAIT)  # the first call holds the thread until `quiet` has a message queued
        order.append("busy")

    with Dispatcher(1, batch=100) as d:
        busy = Inbox("c", "busy", logger, callback=on_busy, dispatcher=d, max_msgs=100_000)
        quiet = Inbox("c", "quiet", logger, callback=lambda m: order.append("quiet"), dispatcher=d)
        busy.offer(msgs(50_000))
        wait_until(lambda: busy.pending < 50_000)
        quiet.offer(msgs(1))
        go.set()
        wait_until(lambda: len(order) == 50_001)
    assert order.index("quiet") == 100  # right after busy's first batch


def test_offer_never_blocks(logger: logging.Logger, dispatcher: Dispatcher) -> None:
    entered, release = threading.Event(), threading.Event()

    def stuck(m: Msg) -> None:
        entered.set()
        release.wait(WAIT)

    own = Inbox("c", "own", logger, callback=stuck, max_msgs=1000)
    shared = Inbox("c", "shared", logger, callback=stuck, dispatcher=dispatcher, max_msgs=1000)
    pull = Inbox("c", "pull", logger, max_msgs=1000)
    reader = threading.Thread(target=lambda: list(pull))
    reader.start()
    try:
        for inbox in (own, shared):
            entered.clear()
            inbox.offer(msgs(1))
            assert entered.wait(WAIT)
        started = time.monotonic()
        for _ in range(2000):
            for inbox in (own, shared, pull):
                inbox.offer(msgs(1))
        assert time.monotonic() - started < 2.0
        assert own.dropped > 0 and shared.dropped > 0
        # Closing from the loop thread with timeout=0 does not wait for the stuck callback.
        started = time.monotonic()
        assert own.close(timeout=0) is False and shared.close(timeout=0) is False
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        pull.close()
        reader.join(WAIT)
    assert own.close(timeout=WAIT) and shared.close(timeout=WAIT)


def test_drain_delivers_pending(logger: logging.Logger) -> None:
    seen: list[bytes] = []

    def slowish(m: Msg) -> None:
        time.sleep(0.001)
        seen.append(m.data)

    inbox = Inbox("c", "s", logger, callback=slowish)
    inbox.offer(msgs(50))
    assert inbox.close(drain=True, timeout=WAIT) is True
    assert seen == [b"%d" % i for i in range(50)] and inbox.discarded == 0
    inbox.offer(msgs(3))
    assert inbox.discarded == 3 and len(seen) == 50


def test_drain_bounded_by_timeout(logger: logging.Logger) -> None:
    release = threading.Event()
    inbox = Inbox("c", "s", logger, callback=lambda m: release.wait(WAIT))
    inbox.offer(msgs(10))
    started = time.monotonic()
    assert inbox.close(drain=True, timeout=0.1) is False
    assert time.monotonic() - started < WAIT / 2
    release.set()
    assert inbox.close(timeout=WAIT)
    assert inbox.delivered + inbox.discarded == 10 and inbox.discarded >= 8


def test_close_without_drain_discards_and_waits_for_the_callback(logger: logging.Logger) -> None:
    entered, release = threading.Event(), threading.Event()
    finished: list[bytes] = []

    def on_msg(m: Msg) -> None:
        entered.set()
        release.wait(WAIT)
        finished.append(m.data)

    inbox = Inbox("c", "s", logger, callback=on_msg)
    inbox.offer(msgs(10))
    assert entered.wait(WAIT)
    threading.Timer(0.1, release.set).start()
    assert inbox.close(drain=False, timeout=WAIT) is True
    assert finished == [b"0"]  # the call in progress ended before close returned
    assert inbox.delivered == 1 and inbox.discarded == 9 and inbox.pending == 0


def test_close_joins_threads(logger: logging.Logger) -> None:
    baseline = threading.active_count()
    before = set(threading.enumerate())
    for i in range(30):
        inbox = Inbox("c", f"s{i}", logger, callback=lambda m: None)
        inbox.offer(msgs(5))
        assert inbox.close(drain=i % 2 == 0, timeout=WAIT)
        d = Dispatcher(3)
        Inbox("c", "x", logger, callback=lambda m: None, dispatcher=d).offer(msgs(5))
        assert d.close(WAIT)
    assert threading.active_count() == baseline
    assert set(threading.enumerate()) == before


def test_own_thread_name(logger: logging.Logger) -> None:
    names: list[str] = []
    inbox = Inbox("plant", "assets.>", logger, callback=lambda m: names.append(threading.current_thread().name))
    inbox.offer(msgs(1))
    wait_until(lambda: bool(names))
    assert inbox.close(timeout=WAIT)
    assert names == ["openfactory-nats-plant-assets.>"]
    assert threading.current_thread().daemon is False  # the caller's; the worker's is checked below
    d = Dispatcher(2, name="pool")
    assert [t.name for t in d._threads] == ["pool-0", "pool-1"] and all(t.daemon for t in d._threads)
    assert d.close(WAIT)


def test_dispatcher_close_closes_its_inboxes(logger: logging.Logger) -> None:
    entered, release = threading.Event(), threading.Event()
    d = Dispatcher(1)

    def on_msg(m: Msg) -> None:
        entered.set()
        release.wait(WAIT)

    stuck = Inbox("c", "stuck", logger, callback=on_msg, dispatcher=d)
    stuck.offer(msgs(5))
    assert entered.wait(WAIT)
    idle = Inbox("c", "idle", logger, callback=lambda m: None, dispatcher=d)
    assert d.close(0.05) is False  # the stuck callback holds its thread
    assert idle.closed and stuck.closed
    idle.offer(msgs(1))
    assert idle.discarded == 1
    release.set()
    assert d.close(WAIT) and stuck.close(timeout=WAIT)
    assert stuck.delivered == 1 and stuck.discarded == 4


def test_mode_and_argument_errors(logger: logging.Logger, dispatcher: Dispatcher) -> None:
    inbox = Inbox("c", "s", logger, callback=lambda m: None)
    with pytest.raises(SubscriptionModeError, match="has a callback") as info:
        inbox.next_msg(0)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(SubscriptionModeError):
        iter(inbox).__next__()
    assert inbox.close(timeout=WAIT)
    with pytest.raises(InvalidMessageError, match="give a callback"):
        Inbox("c", "s", logger, dispatcher=dispatcher)
    with pytest.raises(InvalidTypeError):
        Inbox("c", "s", logger, callback=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidTypeError):
        Inbox("c", "s", logger, callback=lambda m: None, dispatcher=object())  # type: ignore[arg-type]
    with pytest.raises(InvalidMessageError, match="max_msgs must be at least 1"):
        Inbox("c", "s", logger, max_msgs=0)
    with pytest.raises(InvalidTypeError, match="max_bytes must be an int"):
        Inbox("c", "s", logger, max_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidMessageError, match="threads must be at least 1"):
        Dispatcher(0)
    with pytest.raises(InvalidTypeError, match="batch must be an int"):
        Dispatcher(1, batch=True)
    assert "pull" in repr(Inbox("c", "s", logger)) and "threads=4" in repr(dispatcher)


def test_close_on_a_forbidden_thread(logger: logging.Logger) -> None:
    forbidden = threading.get_ident()

    def check() -> None:
        if threading.get_ident() == forbidden:
            raise RuntimeError("This method cannot be called from the event loop thread")

    inbox = Inbox("c", "s", logger, callback=lambda m: None, check_thread=check)
    with pytest.raises(RuntimeError, match="event loop thread"):
        inbox.close(timeout=1)
    assert not inbox.closed  # refused before anything changed
    inbox.offer(msgs(2))
    inbox.close(drain=True, timeout=0)  # does not wait: allowed
    assert inbox.closed
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(inbox.close(drain=True, timeout=WAIT)))
    waiter.start()
    waiter.join(WAIT)
    assert results == [True] and inbox.delivered == 2 and inbox.discarded == 0


def test_background_drain_after_close_without_waiting(logger: logging.Logger) -> None:
    release = threading.Event()
    inbox = Inbox("c", "s", logger, callback=lambda m: release.wait(WAIT))
    inbox.offer(msgs(5))
    assert inbox.close(drain=True, timeout=0) is False
    release.set()
    assert inbox.close(drain=True, timeout=WAIT) is True
    assert inbox.delivered == 5 and inbox.discarded == 0
