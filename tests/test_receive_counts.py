"""The receive side's counts and drains, against real nats-server processes: ``stats()``
receive counters that never go down and add up exactly under subscribe/unsubscribe/drain
churn, a drain during a reconnection, and messages discarded when a close runs out of time."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import weakref
from typing import Any

import pytest

from openfactory_nats import (
    ClusterState,
    ClusterUnavailableError,
    Msg,
    NatsCluster,
    SyncNatsCluster,
)

from .servers import NatsServer, TcpProxy

_RECEIVE_KEYS = ("received", "receive_dropped", "callback_errors", "discarded")


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


class _Raiser:
    """A callback that raises on every third message, counting what it saw and raised."""

    lock = threading.Lock()

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.seen = 0
        self.raised = 0

    def __call__(self, msg: Msg) -> None:
        with self.lock:
            self.seen += 1
            boom = self.seen % 3 == 0
            if boom:
                self.raised += 1
        if self.delay:
            time.sleep(self.delay)
        if boom:
            raise ValueError("boom")


@pytest.mark.timeout(120)
def test_receive_counters_never_go_down_and_add_up_exactly(server: NatsServer) -> None:
    """A subscription's counts live on its receiver and its inbox while it exists, then in
    the cluster's totals: stats() read them non-atomically (a receiver removed between two
    reads was counted twice, then once: ``received`` went down) and folded the callback
    errors in at removal, so the errors a drain or close raised afterwards were lost."""
    quiet = logging.getLogger("test.openfactory_nats.counts")
    quiet.setLevel(logging.CRITICAL)  # hundreds of callback tracebacks are not the point here
    nats = SyncNatsCluster("K1", [server.url], quiet, timeout=10.0, drain_timeout=10.0)
    callbacks: list[_Raiser] = []
    published = 0
    extra_received = 0  # messages received by subscriptions unsubscribed with some pending
    counts_lock = threading.Lock()
    decreases: list[str] = []
    stop = threading.Event()
    failures: list[BaseException] = []

    def poll() -> None:
        last = dict.fromkeys(_RECEIVE_KEYS, 0)
        while not stop.is_set():
            stats = nats.stats()
            for key in _RECEIVE_KEYS:
                value = stats.get(key, 0)
                if value < last[key]:
                    decreases.append(f"{key}: {last[key]} -> {value}")
                last[key] = value

    def churn(t: int) -> None:
        nonlocal published, extra_received
        try:
            shared = nats.dispatcher(2)
            for i in range(12):
                callback = _Raiser(delay=0.0002)
                with counts_lock:
                    callbacks.append(callback)
                subject = f"k.{t}.{i}"
                sub = nats.subscribe(subject, callback=callback, dispatcher=shared if i % 2 else None)
                for _ in range(60):
                    nats.publish(subject, b"x")
                nats.flush()
                with counts_lock:
                    published += 60
                end = i % 4
                if end == 0:  # drained: what is pending is delivered after the receiver is gone
                    sub.drain(timeout=10)
                elif end == 1:  # unsubscribed once everything was delivered
                    assert wait_until(lambda s=sub: s.delivered == 60)  # type: ignore[misc]
                    sub.unsubscribe()
                elif end == 2:  # unsubscribed at once: some messages may be discarded, or not received
                    sub.unsubscribe()
                    with counts_lock:
                        published -= 60
                        extra_received += sub.delivered + sub.dropped + sub.discarded
                # end == 3: left open, drained by close()
        except BaseException as exc:
            failures.append(exc)

    poller = threading.Thread(target=poll, name="test-poll")
    poller.start()
    try:
        workers = [threading.Thread(target=churn, args=(t,), name=f"test-churn-{t}") for t in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(90)
        assert not failures, failures
        nats.close()  # drains the subscriptions left open: their callbacks raise meanwhile
        time.sleep(0.05)  # a few more readings after the close
    finally:
        stop.set()
        poller.join(10)
        nats.close()
    assert not decreases, decreases[:5]
    stats = nats.stats()
    raised = sum(c.raised for c in callbacks)
    seen = sum(c.seen for c in callbacks)
    assert raised > 100
    assert stats["callback_errors"] == raised
    assert stats["received"] == published + extra_received
    assert stats["receive_dropped"] == 0
    assert stats["received"] == seen + stats["discarded"]
    assert stats["subscriptions"] == 0


def _connected_with_pending(nats: SyncNatsCluster, subject: str, count: int) -> tuple[Any, list[Msg], threading.Event]:
    """A subscription whose callback is held, with *count* messages received and pending."""
    release = threading.Event()
    got: list[Msg] = []

    def on_message(msg: Msg) -> None:
        release.wait(10)
        got.append(msg)

    sub = nats.subscribe(subject, callback=on_message)
    for i in range(count):
        nats.publish(subject, b"%d" % i)
    nats.flush()
    assert wait_until(lambda: sub.pending + sub.delivered == count)
    return sub, got, release


@pytest.mark.timeout(30)
def test_drain_during_a_reconnection_waits_for_it(proxy: TcpProxy, logger: logging.Logger) -> None:
    """nats-py cannot drain while reconnecting: the drain gave up at once and raised
    "not drained within 5 s" after 0 s. It waits for the reconnection now, then drains."""
    with SyncNatsCluster("R1", [proxy.url], logger, reconnect_time_wait=0.1, timeout=5.0) as nats:
        sub, got, release = _connected_with_pending(nats, "rd.a", 20)
        proxy.cut()
        assert wait_until(lambda: nats.state is ClusterState.RECONNECTING)
        restorer = threading.Timer(0.5, proxy.restore)
        restorer.start()
        release.set()
        try:
            sub.drain(timeout=5)  # raised ClusterTimeoutError("... not drained within 5 s") before
        finally:
            restorer.join()
        assert nats.is_connected
        assert [int(m.data) for m in got] == list(range(20))
        assert sub.delivered == 20 and sub.discarded == 0 and not sub.is_open
        assert nats.stats()["subscriptions"] == 0


@pytest.mark.timeout(30)
def test_drain_during_an_outage_that_outlasts_it_says_so(proxy: TcpProxy, logger: logging.Logger) -> None:
    """The reconnection does not come within the drain's timeout: the documented
    ClusterUnavailableError, after about that timeout, saying the connection was lost."""
    with SyncNatsCluster("R2", [proxy.url], logger, reconnect_time_wait=0.1, timeout=5.0, drain_timeout=1.0) as nats:
        sub, got, release = _connected_with_pending(nats, "rd.b", 5)
        other = nats.subscribe("rd.other")
        release.set()
        proxy.cut()
        assert wait_until(lambda: nats.state is ClusterState.RECONNECTING)
        other.unsubscribe()  # no drain asked: nothing to wait for, nothing to raise
        started = time.monotonic()
        with pytest.raises(ClusterUnavailableError, match="connection was lost") as raised:
            sub.drain(timeout=1.0)
        waited = time.monotonic() - started
        assert waited >= 0.9, waited  # it waited for the reconnection, not "after 0 s"
        assert raised.value.cluster == "R2"
        assert not sub.is_open and nats.stats()["subscriptions"] == 0
        assert wait_until(lambda: len(got) == 5)  # what had been received is still delivered


@pytest.mark.timeout(30)
def test_messages_left_when_close_runs_out_of_time_are_counted_discarded(
    server: NatsServer, logger: logging.Logger, caplog: Any
) -> None:
    """Received messages still pending when close()'s drain time ran out were thrown away
    without a count: they are ``discarded`` now (subscription and stats()), logged once."""
    nats = SyncNatsCluster("X1", [server.url], logger, drain_timeout=5.0)
    try:
        sub = nats.subscribe("x.slow", callback=lambda m: time.sleep(0.02))
        for _ in range(200):
            nats.publish("x.slow", b"x")
        nats.flush()
        assert wait_until(lambda: sub.pending + sub.delivered == 200 and sub.delivered >= 1)
        with caplog.at_level(logging.INFO, logger=logger.name):
            nats.close(timeout=0.3)
            # The callback running when the time ran out finishes first, then the rest goes.
            assert wait_until(lambda: sub.delivered + sub.discarded == 200)
    finally:
        nats.close()
    stats = nats.stats()
    assert sub.pending == 0 and sub.dropped == 0
    assert 0 < sub.discarded < 200
    assert stats["discarded"] == sub.discarded
    assert stats["received"] == 200
    assert stats["received"] == sub.delivered + sub.discarded + sub.dropped
    lines = [r for r in caplog.records if "message(s) discarded" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert str(sub.discarded) in lines[0].getMessage()


@pytest.mark.timeout(30)
def test_async_subscription_counts_what_unsubscribe_discards(server: NatsServer, logger: logging.Logger) -> None:
    async def main() -> None:
        cluster = NatsCluster("X2", [server.url], logger)
        try:
            pull = await cluster.subscribe("xa.pull")
            for _ in range(50):
                await cluster.publish("xa.pull", b"x")
            await cluster.flush()
            for _ in range(500):
                if pull.pending == 50:
                    break
                await asyncio.sleep(0.01)
            await pull.next_msg(5)
            await pull.unsubscribe()
            assert pull.delivered == 1 and pull.discarded == 49
            stats = cluster.stats()
            assert stats["discarded"] == 49 and stats["received"] == 50
        finally:
            await cluster.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_drained_pull_subscription_dropped_by_its_user_is_not_kept_forever(
    server: NatsServer, logger: logging.Logger
) -> None:
    """Nothing of a subscription is kept once its user drops it, even when it was drained
    with messages still unread (found in review: the counts were once read from retired
    receivers until their inbox settled, which a pull inbox left unread never does), and
    its counts stay in stats()."""
    with SyncNatsCluster("R1", [server.url], logger, timeout=10.0) as nats:
        refs = []
        for i in range(5):
            sub = nats.subscribe(f"leak.{i}")
            for _ in range(3):
                nats.publish(f"leak.{i}", b"x" * 1000)
            nats.flush()
            assert wait_until(lambda s=sub: s.pending == 3)  # type: ignore[misc]
            sub.drain(timeout=5)  # pull mode: what is pending stays readable; nobody reads it
            refs.append(weakref.ref(sub._inbox))
            del sub
        gc.collect()
        stats = nats.stats()
        assert stats["received"] == 15
        assert stats["subscriptions"] == 0
        assert stats["discarded"] == 0  # still readable until the subscription is collected
        alive = [ref for ref in refs if ref() is not None]
        assert not alive, f"{len(alive)} inboxes (and their messages) kept after their subscriptions were dropped"
