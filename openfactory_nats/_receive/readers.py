"""Pull mode: the threads waiting in :meth:`Inbox.next_msg
<openfactory_nats._receive.inbox.Inbox.next_msg>`, and how an offer wakes them.

Readers wait on a condition of the inbox's short lock (which waiting releases); an offer
wakes as many readers as it brings messages, not all of them. With :attr:`Readers.spread`
set (``serve``'s workers, see ``Inbox.wake_lazily``), it wakes one, and more only when
messages still wait *spread* seconds later.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from .._message import Msg

__all__ = ("Readers",)


class Readers:
    """The readers of one inbox.

    :param lock: the inbox's short lock; :attr:`idle` and the waking are under it.
    :param items: the inbox's queue, for the later look at what still waits.
    """

    def __init__(self, lock: threading.Lock, items: deque[Msg]) -> None:
        self._lock = lock
        self._items = items
        self.readable = threading.Condition(lock)
        self.idle = 0  # readers waiting for a message (under the lock)
        self.spread: float | None = None  # see Inbox.wake_lazily
        self._spreading = False  # a look at the waiting messages is scheduled (under the lock)

    def renew(self, lock: threading.Lock) -> None:
        """(A forked child) Wait on the inbox's new *lock*."""
        self._lock = lock
        self.readable = threading.Condition(lock)

    def wake(self, count: int) -> None:
        """(Under the lock) Wake readers for *count* new messages."""
        spread = self.spread
        if spread is None or count == 1 or self.idle == 1:
            self.readable.notify(count)
            return
        self.readable.notify(1)
        if self._spreading:
            return
        try:
            asyncio.get_running_loop().call_later(spread, self._spread_readers)
        except RuntimeError:  # offered from outside an event loop: wake them all now
            self.readable.notify(count - 1)
            return
        self._spreading = True

    def _spread_readers(self) -> None:
        """(The loop, *spread* s after an offer) Wake readers for the messages still waiting."""
        with self._lock:
            self._spreading = False
            if self._items and self.idle:
                self.readable.notify(len(self._items))
