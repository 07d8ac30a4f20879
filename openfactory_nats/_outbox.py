"""The hand-off from publishing threads to the event loop, bounded in bytes.

Publishing threads append ready-made frames to a ``deque`` without taking a lock, and
wake the loop once per batch. A lock taken on every publish makes threads queue up
behind each other (a lock convoy under the GIL); instead each thread leases a slice of
the byte budget and spends it locally, taking the lock only to renew its lease. The loop
gives bytes back to the pool once they have left the process (written to the socket).

The budget is never overdrawn: leased-but-unspent bytes count as used, so at most
``threads * chunk`` bytes of capacity can sit idle in the leases of quiet threads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from ._errors import BufferFullError

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
    """

    def __init__(self, capacity: int, wake: Callable[[], object], cluster: str, limit: int | None = None) -> None:
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

    # -- producer side (any thread) ---------------------------------------------------
    def put(self, item: T, size: int, timeout: float) -> None:
        """Queue *item* of *size* bytes, waiting up to *timeout* seconds for room.

        :raises BufferFullError: when there is still no room after *timeout* seconds.
        """
        lease = self._lease()
        if lease.left < size:
            self._renew(lease, size, timeout)
        lease.left -= size
        self._items.append(item)
        if not self.scheduled:
            self.scheduled = True
            self._wake()

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
    def take(self, max_bytes: int = 0, sizeof: Callable[[T], int] = len) -> list[T]:  # type: ignore[assignment]
        """Remove and return queued items, oldest first: all of them, or (with
        *max_bytes*) as many as it takes to reach *max_bytes*."""
        self.scheduled = False
        items = self._items
        count = len(items)
        pop = items.popleft
        if not max_bytes:
            return [pop() for _ in range(count)]
        taken: list[T] = []
        total = 0
        while count and total < max_bytes:
            item = pop()
            taken.append(item)
            total += sizeof(item)
            count -= 1
        return taken

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
