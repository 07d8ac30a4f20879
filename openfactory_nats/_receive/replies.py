"""Request/reply: one inbox subscription per cluster, replies matched to waiting callers.

A request is a ``PUB`` frame with a reply subject ``<inbox>.<token>``, queued like any
published message (so it never overtakes what the same thread published before) and
sent by the same pump. The cluster subscribes once to ``<inbox>.*``; :class:`Replies`
is that subscription's sink and hands each reply to the caller waiting for its token,
on the event loop, without a round trip through a coroutine. A reply that comes after
its caller gave up is dropped and counted (``late_replies``); nothing is kept for it.

The server answers a request nobody listens to with a status-503 message at once
(:class:`NoRespondersError`); a responder built with ``serve`` answers a failing
handler with the NATS services error headers (:class:`ServiceError`).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
from collections import deque
from collections.abc import Callable, Mapping

from .._errors import ClusterClosedError, NatsClusterError, NoRespondersError, ServiceError
from .._forksafe import renew_after_fork
from .._message import Msg

__all__ = ("SERVICE_ERROR", "SERVICE_ERROR_CODE", "Replies", "Waiter", "build_request_frame", "check_reply")

SERVICE_ERROR = "Nats-Service-Error"
SERVICE_ERROR_CODE = "Nats-Service-Error-Code"
_STATUS = "Status"
_NO_RESPONDERS = "503"


class Waiter:
    """One caller waiting for its reply: a blocked thread, or a future on the loop."""

    __slots__ = ("_future", "_lock", "error", "finished", "msg", "reply", "token")

    def __init__(self, token: bytes, reply: bytes, future: asyncio.Future[None] | None = None) -> None:
        self.token = token
        #: The subject the reply is to be sent to.
        self.reply = reply
        self.msg: Msg | None = None
        self.error: NatsClusterError | None = None
        #: Its caller is done with it (answered or not): it is not woken any more.
        self.finished = False
        self._future = future
        self._lock: threading.Lock | None = None
        if future is None:
            self._lock = threading.Lock()
            self._lock.acquire()

    def _done(self) -> None:
        if self._lock is not None:
            self._lock.release()
        elif self._future is not None and not self._future.done():
            self._future.get_loop().call_soon_threadsafe(_set_result, self._future)

    def complete(self, msg: Msg) -> None:
        self.msg = msg
        self._done()

    def fail(self, error: NatsClusterError) -> None:
        self.error = error
        self._done()

    def wait(self, timeout: float) -> bool:
        """(A thread) True once the reply or an error came, within *timeout* s."""
        assert self._lock is not None
        return self._lock.acquire(timeout=max(0.0, timeout))

    @property
    def future(self) -> asyncio.Future[None]:
        assert self._future is not None
        return self._future


def _set_result(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Replies:
    """The sink of a cluster's inbox subscription (see the module docstring).

    Threads waiting for replies are woken one after the other, not all at once: the
    loop wakes the first of those answered, and each passes the turn on to the next as
    it leaves :meth:`forget`. Woken all at once, they would queue for the interpreter
    lock, each sleeping and waking once more. Requests sent while such a relay runs
    wait for it to end (see :meth:`relaying`), so that they leave in one write, as
    they do from asyncio tasks.
    """

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.prefix = f"_INBOX.{secrets.token_hex(11)}"
        self._prefix_bytes = f"{self.prefix}.".encode()
        self._start = len(self._prefix_bytes)
        self._tokens = itertools.count(1)
        self._waiting: dict[bytes, Waiter] = {}
        self._closed = False
        # The relay: the answered thread whose turn it is, and those after it.
        self._turn: Waiter | None = None
        self._queue: deque[Waiter] = deque()
        self._relay_lock = threading.Lock()
        #: Called (on a requesting thread) when a relay ends, to send what it queued.
        self.on_relay_end: Callable[[], object] = lambda: None
        #: Replies that came for no caller (it had given up): dropped.
        self.late = 0
        renew_after_fork(self)

    def count_into(self, tally: object) -> None:
        """(The sink protocol) Nothing of a subscription's kind is lost here: a reply
        nobody waits for any more is counted in :attr:`late`."""

    def _renew_after_fork(self) -> None:
        self._relay_lock = threading.Lock()  # a parent thread may have held it at the fork

    @property
    def subject(self) -> str:
        """The subscription's subject filter."""
        return f"{self.prefix}.*"

    def expect(self, future: asyncio.Future[None] | None = None) -> Waiter:
        """Register a caller (any thread); its reply subject is ``waiter.reply``.

        :raises ClusterClosedError: once the cluster is closing.
        """
        token = b"%d" % next(self._tokens)
        waiter = Waiter(token, self._prefix_bytes + token, future)
        self._waiting[token] = waiter
        if self._closed:
            self._waiting.pop(token, None)
            raise ClusterClosedError(f"cluster {self.cluster!r} is closed", cluster=self.cluster)
        return waiter

    def waiting(self, reply: bytes) -> bool:
        """False for a reply subject of this inbox that nobody waits on any more; True
        for anything else."""
        if not reply.startswith(self._prefix_bytes):
            return True
        return reply[self._start :] in self._waiting

    def relaying(self) -> bool:
        """True while answered threads are being woken (any thread)."""
        return self._turn is not None

    def forget(self, waiter: Waiter) -> None:
        """The caller is done (answered or not): a reply coming later is dropped. A
        thread whose turn it was passes it on (see the class docstring)."""
        self._waiting.pop(waiter.token, None)
        if waiter._lock is None:
            return
        with self._relay_lock:
            waiter.finished = True
            if self._turn is not waiter:
                return
            after = self._next_turn()
        if after is not None:
            after._done()
        else:
            self.on_relay_end()

    def _next_turn(self) -> Waiter | None:
        """(Under the relay lock) The next answered waiter still waiting, whose turn it is now."""
        queue = self._queue
        while queue:
            waiter = queue.popleft()
            if not waiter.finished:
                self._turn = waiter
                return waiter
        self._turn = None
        return None

    def _answer(self, waiter: Waiter, msg: Msg) -> None:
        if waiter._lock is None:
            waiter.complete(msg)
            return
        with self._relay_lock:
            if waiter.finished:  # it gave up meanwhile
                self.late += 1
                return
            waiter.msg = msg
            if self._turn is not None:
                self._queue.append(waiter)
                return
            self._turn = waiter
        waiter._done()

    def deliver(self, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None) -> None:
        """(The loop) A reply, as nats-py reads it: hand it to its caller. One that
        cannot be read raises before its caller is taken off the waiting list (it is
        counted as malformed; the caller's wait ends with its timeout)."""
        msg = Msg(subject.decode(), data, headers, reply.decode() if reply else None)
        waiter = self._waiting.pop(subject[self._start :], None)
        if waiter is None:
            self.late += 1
            return
        self._answer(waiter, msg)

    def offer(self, batch: list[Msg]) -> None:
        """(The loop) Hand each reply to its caller (the sink protocol)."""
        start = self._start
        for msg in batch:
            waiter = self._waiting.pop(msg.subject[start:].encode(), None)
            if waiter is None:
                self.late += 1
            else:
                self._answer(waiter, msg)

    def fail_all(self, error: NatsClusterError) -> None:
        """Wake every caller with *error* (any thread); refuse new ones from now on."""
        self._closed = True
        self.fail_waiting(error)

    def fail_waiting(self, error: NatsClusterError) -> None:
        """Wake every caller waiting now with *error* (any thread); those answered
        already, waiting for their turn, are woken with their reply."""
        with self._relay_lock:
            answered, self._queue = list(self._queue), deque()
        for waiter in answered:
            waiter._done()
        while self._waiting:
            try:
                _, waiter = self._waiting.popitem()
            except KeyError:
                break
            waiter.fail(error)

    def close(self, drain: bool = False, timeout: float = 0.0) -> bool:
        self.fail_all(ClusterClosedError(f"cluster {self.cluster!r} is closed", cluster=self.cluster))
        return True


def check_reply(cluster: str, subject: str, msg: Msg) -> Msg:
    """Return the reply, or raise what it stands for.

    :raises NoRespondersError: for the server's status 503 (nobody listens on *subject*).
    :raises ServiceError: for a reply carrying the NATS services error headers.
    """
    headers = msg.headers
    if headers:
        if headers.get(_STATUS) == _NO_RESPONDERS and not msg.data:
            raise NoRespondersError(f"cluster {cluster!r}: no responders on {subject!r}", cluster=cluster)
        code = headers.get(SERVICE_ERROR_CODE)
        if code is not None:
            text = headers.get(SERVICE_ERROR, "")
            raise ServiceError(
                f"cluster {cluster!r}: the service on {subject!r} failed ({code}): {text}",
                cluster=cluster,
                code=int(code) if code.strip().isdigit() else 0,
                description=text,
            )
    return msg


def build_request_frame(subject: bytes, reply: bytes, payload: bytes, headers: bytes | None) -> bytes:
    """The ``PUB``/``HPUB`` frame of a request (subject, payload and header block already
    validated and encoded)."""
    if headers is None:
        return b"PUB %b %b %d\r\n%b\r\n" % (subject, reply, len(payload), payload)
    total = len(headers) + len(payload)
    return b"HPUB %b %b %d %d\r\n%b%b\r\n" % (subject, reply, len(headers), total, headers, payload)


def error_headers(exc: BaseException) -> Mapping[str, str]:
    """The NATS services error headers for a handler that raised *exc*: a
    :class:`ServiceError`'s own code and description, else 500 and the exception."""
    if isinstance(exc, ServiceError):
        code = exc.code if isinstance(exc.code, int) and not isinstance(exc.code, bool) else 500
        text = str(exc.description) or str(exc)  # ServiceError("text") has no description
        return {SERVICE_ERROR: _header_text(text), SERVICE_ERROR_CODE: str(code)}
    return {SERVICE_ERROR: _header_text(f"{type(exc).__name__}: {exc}"), SERVICE_ERROR_CODE: "500"}


def _header_text(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)[:200]
