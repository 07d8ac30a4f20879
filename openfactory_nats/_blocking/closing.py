"""Closing the blocking layer, in one place.

A :class:`~openfactory_nats.SyncNatsCluster` and a
:class:`~openfactory_nats.SyncClusterRouter` close through :func:`shut_down`, whether
``close()`` was called or the instance was collected (or left open at exit) and its
finalizer runs. What each instance owns is listed in its :class:`Holdings`: the core,
the threads of its subscriptions, and the lock that makes a second ``close()`` wait for
the first. The steps, for all the cores at once (a stalled cluster does not eat the
others' time): refuse new messages; drain and close the cores on their loop; stop the
loop if the instance owns it; let the subscriptions deliver what they hold; join their
threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._core.cluster import NatsCluster
from .._receive.dispatcher import Dispatcher, delivering
from .loop import LoopThread, on_an_event_loop

__all__ = ("CLOSE_MARGIN", "Holdings", "shut_down")

#: Beyond the caller's timeout: the time the cores take to abort a late drain.
CLOSE_MARGIN = 2.0


@dataclass(eq=False)
class Holdings:
    """What one blocking instance owns and ends when it closes."""

    core: NatsCluster
    #: The dispatchers made with ``dispatcher()`` and the threads ``serve`` started.
    dispatchers: list[Dispatcher] = field(default_factory=list)
    workers: list[threading.Thread] = field(default_factory=list)
    #: Held by the close in progress: another one waits for it.
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: The process that made the instance: in a forked child, none of it is closed.
    pid: int = field(default_factory=os.getpid)


def shut_down(
    holdings: Sequence[Holdings],
    runner: LoopThread,
    wait: float,
    *,
    owns_loop: bool,
    dispatchers: Sequence[Dispatcher] = (),
    collected: bool = False,
) -> bool:
    """Close what *holdings* hold within *wait* s (plus :data:`CLOSE_MARGIN` for the
    abort of a late drain), stopping *runner* if *owns_loop*; *dispatchers* are the
    caller's own (a router's). Returns False when another close held a lock for longer
    than that (it goes on closing; a finalizer logs it, ``close()`` raises).

    Where waiting would hold up an event loop (a finalizer, *collected*, running on an
    event loop's thread: the instance's, another cluster's, an application's) or wait for
    itself (a callback or handler closing its own cluster), another thread does the
    closing: not a daemon, so that an exit waits for the bounded drain instead of cutting
    it short.
    """
    holdings = [held for held in holdings if held.pid == os.getpid()]  # a fork's belong to the parent
    if not holdings:
        if owns_loop and runner.thread.is_alive() and not runner.in_loop_thread():  # one started in this child
            runner.stop(1.0)
        return True
    cores = [held.core for held in holdings]
    for core in cores:
        core.begin_close()  # refuse new messages from now on, in every thread
    if delivering() or (collected and on_an_event_loop()):
        args = (holdings, runner, wait, owns_loop, dispatchers)
        try:
            threading.Thread(target=_shut_down_here, args=args, name=_thread_name(cores)).start()
        except RuntimeError:  # no new thread at interpreter shutdown
            _close_without_waiting(cores, runner, wait, owns_loop, [*dispatchers, *_dispatchers(holdings)])
        return True
    # No subscription is added once closing has begun: these are all of them.
    sinks = list({id(sink): sink for core in cores for sink in core.incoming.sinks()}.values())
    started = time.monotonic()
    deadline = started + wait + CLOSE_MARGIN
    drained_by = started + min(wait, max(core.drain_timeout for core in cores))
    locked: list[threading.Lock] = []
    try:
        for held in holdings:
            if not held.lock.acquire(timeout=max(0.0, started + wait + 2 * CLOSE_MARGIN - time.monotonic())):
                if collected:  # nobody to tell but the log
                    _report_late(holdings, wait)
                return False
            locked.append(held.lock)
        _close_cores(cores, runner, wait, deadline)
        if owns_loop:
            runner.stop(max(1.0, deadline - time.monotonic()))
        # User code (callbacks, handlers) gets the caller's timeout, not the margin that
        # is there for aborting a late drain.
        ends = started + wait
        for sink in sinks:
            sink.close(drain=True, timeout=max(0.0, drained_by - time.monotonic()))
        for dispatcher in [*dispatchers, *_dispatchers(holdings)]:
            dispatcher.close(max(0.0, ends - time.monotonic()))
        current = threading.current_thread()
        for held in holdings:
            for worker in held.workers:
                if worker is not current:
                    worker.join(max(0.0, ends - time.monotonic()))
        return True
    finally:
        for lock in locked:
            lock.release()


def _shut_down_here(
    holdings: Sequence[Holdings], runner: LoopThread, wait: float, owns_loop: bool, dispatchers: Sequence[Dispatcher]
) -> None:
    """:func:`shut_down` on a thread of its own, where nobody is told but the log."""
    if not shut_down(holdings, runner, wait, owns_loop=owns_loop, dispatchers=dispatchers):
        _report_late(holdings, wait)


def _report_late(holdings: Sequence[Holdings], wait: float) -> None:
    core = holdings[0].core
    core.logger.warning("cluster %s: another close() did not finish within %g s", core.name, wait)


def _dispatchers(holdings: Sequence[Holdings]) -> list[Dispatcher]:
    return [dispatcher for held in holdings for dispatcher in held.dispatchers]


def _thread_name(cores: Sequence[NatsCluster]) -> str:
    return f"openfactory-nats-{cores[0].name if len(cores) == 1 else 'router'}-close"


def _close_cores(cores: Sequence[NatsCluster], runner: LoopThread, wait: float, deadline: float) -> None:
    """Drain and close *cores* at once on *runner*'s loop, by *deadline*."""
    if not runner.thread.is_alive():
        return  # its loop ended: nothing of theirs can be sent any more (the cores counted it)
    coro = _close_all(cores, wait)
    try:
        future = runner.submit(coro)
    except RuntimeError:  # the loop is closed already
        coro.close()
        return
    try:
        future.result(max(0.0, deadline - time.monotonic()))
    except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
        future.cancel()
        for core in cores:
            core.logger.warning("cluster %s: close did not finish within %g s", core.name, wait)
    except Exception:  # a bug of ours: the rest of the closing goes on
        cores[0].logger.exception("closing %s failed", ", ".join(core.name for core in cores))


async def _close_all(cores: Sequence[NatsCluster], wait: float) -> None:
    outcomes = await asyncio.gather(*(core.close(wait) for core in cores), return_exceptions=True)
    for core, outcome in zip(cores, outcomes, strict=True):
        if isinstance(outcome, Exception):
            core.logger.error("cluster %s: close failed: %s", core.name, outcome, exc_info=outcome)


def _close_without_waiting(
    cores: Sequence[NatsCluster], runner: LoopThread, wait: float, owns_loop: bool, dispatchers: Sequence[Dispatcher]
) -> None:
    """Start closing *cores* on their loop, and stop the loop after them if it is owned;
    wait for nothing (the subscriptions' threads end on their own)."""
    for dispatcher in dispatchers:
        dispatcher.close(timeout=0)
    coro = _close_all(cores, wait)
    try:
        future = runner.submit(coro)
    except RuntimeError:  # the loop is closed already
        coro.close()
        return
    if owns_loop:
        future.add_done_callback(lambda _: _stop_soon(runner))


def _stop_soon(runner: LoopThread) -> None:
    with contextlib.suppress(RuntimeError):  # closed already
        runner.loop.call_soon_threadsafe(runner.loop.stop)
