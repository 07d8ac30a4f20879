"""The hand-off from publishing threads to the event loop, bounded in bytes.

Publishing threads append ready-made frames to a ``deque`` without taking a lock, and
wake the loop once per batch. A lock taken on every publish makes threads queue up
behind each other (a lock convoy under the GIL); instead each thread leases a slice of
the byte budget and spends it locally, taking the lock only to renew its lease. The loop
gives bytes back to the pool once they have left the process (written to the socket).

The budget is never overdrawn: leased-but-unspent bytes count as used, so at most
``threads * chunk`` bytes of capacity can sit idle in the leases of quiet threads.

Shutting down, without a lock on the hot path: :meth:`Outbox.shut` refuses new puts
(producers check a flag before appending, and waiting producers are woken and refused);
:meth:`Outbox.seal` marks the consumer's final take. A producer that appended after the
seal finds it set when it looks again after its append, and sweeps what was appended
late itself: such messages are reported through ``on_late`` (counted as dropped) and the
producer raises ``ClusterClosedError``. So every message ends either handed to the
consumer, or reported, and a producer that returned normally had its message taken by
the consumer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from .._errors import BufferFullError, ClusterClosedError
from .._forksafe import renew_after_fork

__all__ = ("Outbox",)

T = TypeVar("T")


class _Lease:
    """A thread's private slice of the budget."""

    __slots__ = ("__weakref__", "left", "returns")

    def __init__(self, returns: deque[int]) -> None:
        self.left = 0
        self.returns = returns

    def __del__(self) -> None:
        # The owning thread has ended: hand the unspent bytes back without a lock, since
        # a finaliser may run in any thread, including one holding the pool's lock.
        if self.left:
            self.returns.append(self.left)
            self.left = 0


class Outbox(Generic[T]):
    """A byte-bounded, multi-producer, single-consumer queue.

    :param capacity: the most bytes that may be queued or in flight at once.
    :param wake: called (from a producer thread) when the consumer should run; it must be
        thread-safe and must not block.
    :param cluster: the cluster name, for error messages.
    :param limit: the user-facing limit that *capacity* derives from, for error messages
        (defaults to *capacity*).
    :param on_late: called with the items a producer swept after the final take; they
        will never be sent.
    """

    def __init__(
        self,
        capacity: int,
        wake: Callable[[], object],
        cluster: str,
        limit: int | None = None,
        on_late: Callable[[list[T]], object] | None = None,
    ) -> None:
        self.capacity = capacity
        self.limit = capacity if limit is None else limit
        self.chunk = max(1, min(256 * 1024, capacity // 64))
        self.cluster = cluster
        self._wake = wake
        self._cond = threading.Condition(threading.Lock())
        self._available = capacity
        self._returns: deque[int] = deque()
        self._tls = threading.local()
        self._items: deque[T] = deque()
        #: True while a wake-up is pending; the consumer clears it before taking items.
        self.scheduled = False
        #: Number of producers waiting for room; the consumer polls while it is non-zero.
        self.waiters = 0
        #: Items removed by the consumer so far (see :meth:`mark`).
        self.taken = 0
        self._on_late = on_late
        self._shut = False
        self._sealed = False
        renew_after_fork(self)

    def _renew_after_fork(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.waiters = 0

    # -- producer side (any thread) ---------------------------------------------------
    def put(self, item: T, size: int, timeout: float, wake: bool = True) -> None:
        """Queue *item* of *size* bytes, waiting up to *timeout* seconds for room.
        Without *wake*, the consumer is not woken for it: the caller makes sure that a
        later :meth:`put` or :meth:`kick` does.

        :raises BufferFullError: when there is still no room after *timeout* seconds.
        :raises ClusterClosedError: once :meth:`shut` was called and the consumer took
            its last items (or while waiting for room).
        """
        try:
            lease: _Lease = self._tls.lease  # (what _lease does, inline: once per message)
        except AttributeError:
            lease = self._lease()
        if lease.left < size:
            self._renew(lease, size, timeout)
        lease.left -= size
        self._items.append(item)
        if self._shut:
            self._after_shut()
        if wake and not self.scheduled:
            self.scheduled = True
            self._wake()

    def kick(self) -> None:
        """Wake the consumer when items wait and no wake-up is pending (any thread)."""
        if self._items and not self.scheduled:
            self.scheduled = True
            self._wake()

    def _closed_error(self) -> ClusterClosedError:
        return ClusterClosedError(f"cluster {self.cluster!r} is closed", cluster=self.cluster)

    def _after_shut(self) -> None:
        """This producer appended while shutting down. Before the seal, the consumer's
        final take will see the item; after it, nobody will: sweep and report."""
        if not self._sealed:
            return
        late: list[T] = []
        items = self._items
        while True:
            try:
                late.append(items.popleft())
            except IndexError:
                break
        if late and self._on_late is not None:
            self._on_late(late)
        raise self._closed_error()

    def shut(self) -> None:
        """Refuse new items from now on, and wake producers waiting for room (they get
        ``ClusterClosedError``). What is queued stays for the consumer."""
        self._shut = True
        with self._cond:
            self._cond.notify_all()

    def seal(self) -> list[T]:
        """The consumer's final take (after :meth:`shut`): return everything left."""
        self._shut = True
        self._sealed = True
        return self.take()

    @property
    def is_shut(self) -> bool:
        """True once :meth:`shut` was called."""
        return self._shut

    def _lease(self) -> _Lease:
        try:
            lease: _Lease = self._tls.lease
        except AttributeError:
            lease = self._tls.lease = _Lease(self._returns)
        return lease

    def reserve(self, size: int, timeout: float) -> None:
        """Wait up to *timeout* s until this thread's lease covers *size* bytes, so that
        the next :meth:`put` of that size does not wait. A caller holding a large message
        can drop it while waiting, keeping memory within the budget.

        :raises BufferFullError: when there is still no room after *timeout* seconds.
        """
        lease = self._lease()
        if lease.left < size:
            self._renew(lease, size, timeout)

    def try_reserve(self, size: int) -> bool:
        """:meth:`reserve` without waiting: True when the room is there."""
        try:
            self.reserve(size, 0.0)
        except BufferFullError:
            return False
        return True

    def _renew(self, lease: _Lease, size: int, timeout: float) -> None:
        if size > self.capacity:
            raise BufferFullError(
                f"cluster {self.cluster!r}: a message of {size} bytes can never fit the "
                f"outgoing buffer of {self.limit} bytes",
                cluster=self.cluster,
                capacity=self.limit,
                size=size,
            )
        deadline: float | None = None
        with self._cond:
            self._collect_returns()
            self._available += lease.left
            lease.left = 0
            while self._available < size:
                if self._shut:
                    raise self._closed_error()
                if deadline is None:
                    deadline = time.monotonic() + timeout
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BufferFullError(
                        f"cluster {self.cluster!r}: outgoing buffer full ({self.limit} bytes "
                        f"queued or unwritten) for {timeout:g} s; the server is slow, stalled "
                        "or unreachable",
                        cluster=self.cluster,
                        capacity=self.limit,
                        size=size,
                    )
                self.waiters += 1
                try:
                    self._wake()
                    self._cond.wait(min(remaining, 0.05))
                finally:
                    self.waiters -= 1
                self._collect_returns()
            grant = min(self._available, max(size, self.chunk))
            self._available -= grant
            lease.left = grant

    def _collect_returns(self) -> None:
        while self._returns:
            self._available += self._returns.popleft()

    # -- consumer side (the event loop) ------------------------------------------------
    def take(self) -> list[T]:
        """Remove and return every queued item, oldest first."""
        return self.take_upto(0)[0]

    def take_upto(self, max_bytes: int, sizeof: Callable[[T], int] = len) -> tuple[list[T], int]:  # type: ignore[assignment]
        """Remove and return queued items, oldest first: all of them (*max_bytes* 0), or
        as many as it takes to reach *max_bytes*; with their size in bytes (counted with
        *max_bytes* only, else 0)."""
        self.scheduled = False
        items = self._items
        count = len(items)
        pop = items.popleft
        if self._sealed:
            return self._take_racing_sweeps(max_bytes, sizeof)
        if not max_bytes:
            self.taken += count
            return [pop() for _ in range(count)], 0
        taken: list[T] = []
        total = 0
        while count and total < max_bytes:
            item = pop()
            taken.append(item)
            total += sizeof(item)
            count -= 1
        self.taken += len(taken)
        return taken, total

    def _take_racing_sweeps(self, max_bytes: int, sizeof: Callable[[T], int]) -> tuple[list[T], int]:
        """:meth:`take_upto` once sealed, when late producers may sweep the queue at the same
        time: pop until it is empty rather than trust a length read before."""
        taken: list[T] = []
        total = 0
        while not max_bytes or total < max_bytes:
            try:
                item = self._items.popleft()
            except IndexError:
                break
            taken.append(item)
            total += sizeof(item)
        self.taken += len(taken)
        return taken, total

    def mark(self) -> int:
        """(Consumer) The value :attr:`taken` reaches once everything queued now has
        been taken; items appended later do not move it."""
        return self.taken + len(self._items)

    def release(self, nbytes: int) -> None:
        """Give *nbytes* back to the budget once they are no longer held in memory."""
        if nbytes <= 0:
            return
        with self._cond:
            self._available += nbytes
            if self.waiters:
                self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def available(self) -> int:
        """Bytes of budget neither leased nor in flight (a snapshot)."""
        return self._available
