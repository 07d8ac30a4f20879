"""A dedicated daemon thread running an asyncio event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ("INHERITED", "LoopThread", "SharedLoop", "keep_inherited", "on_an_event_loop")

T = TypeVar("T")
# What a forked child inherited from its parent: kept alive and untouched, because
# closing an inherited event loop would deregister the parent's sockets from the epoll
# instance that parent and child share.
INHERITED: dict[int, object] = {}


def keep_inherited(runner: LoopThread, *others: object) -> None:
    """Keep what a forked child inherited alive, untouched, once: a loop that had
    already stopped in the parent holds no registrations and needs no keeping."""
    if runner.loop.is_closed():
        return
    INHERITED.setdefault(id(runner), (runner, *others))


_STARTUP_TIMEOUT = 10.0
_SHUTDOWN_GRACE = 1.0
_local = threading.local()


def on_an_event_loop() -> bool:
    """True on a thread that runs an event loop now (the library's or an application's),
    or on a library loop thread at all: waiting there would hold up every task of that
    loop, so a finalizer run there must hand its waiting to another thread."""
    if getattr(_local, "loop_thread", False):
        return True
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class LoopThread:
    """Runs an event loop on a named daemon thread until :meth:`stop`.

    A start-up handshake hands the loop, or the error that prevented it, back to the
    thread that created the instance.
    """

    def __init__(self, name: str) -> None:
        started: concurrent.futures.Future[asyncio.AbstractEventLoop] = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._run, args=(started,), name=name, daemon=True)
        self.thread.start()
        try:
            self.loop = started.result(_STARTUP_TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise RuntimeError(f"event-loop thread {name!r} did not start within {_STARTUP_TIMEOUT:g} s") from None

    def _run(self, started: concurrent.futures.Future[asyncio.AbstractEventLoop]) -> None:
        _local.loop_thread = True
        try:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(loop)
        try:
            loop.run_forever()
        finally:
            try:
                tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in tasks:
                    task.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.wait(tasks, timeout=_SHUTDOWN_GRACE))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def in_loop_thread(self) -> bool:
        """True when called on the loop's own thread."""
        return threading.current_thread() is self.thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule *coro* on the loop and return a future for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float) -> bool:
        """Stop the loop and join the thread for up to *timeout* s; True if it ended."""
        if self.thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
        return not self.thread.is_alive()


class SharedLoop:
    """One :class:`LoopThread` shared by several facades (a router's clusters).

    In a forked child, :meth:`current` starts a fresh thread and loop on first use and
    leaves the inherited ones untouched.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self.runner = LoopThread(name)
        _shared.add(self)

    @property
    def forked(self) -> bool:
        """True in a forked child that has not used the loop yet."""
        return self._pid != os.getpid()

    def current(self) -> LoopThread:
        """The loop thread of this process."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    keep_inherited(self.runner)
                    self.runner = LoopThread(self.name)
                    self._pid = os.getpid()
        return self.runner

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # it may have been held by a thread that is gone


_shared: weakref.WeakSet[SharedLoop] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for shared in list(_shared):
        shared._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
