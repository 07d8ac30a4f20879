"""The life cycle of a cluster connection: one owner, transitions in one place.

A :class:`~openfactory_nats.NatsCluster` is always in one *phase*, kept here and only
here; every other layer (the publish pump, the nats-py callbacks, the blocking facade,
the router) asks this object and never keeps a flag of its own:

``NEW``
    Constructed; no client yet. The first ``connect`` (explicit, or lazily by the first
    publish or flush) moves it to ``CONNECTING``. Any thread may read the phase; only the
    event-loop thread moves it, except for :meth:`Lifecycle.begin_close`.
``CONNECTING``
    A connection attempt runs on the event-loop thread. It ends in ``OPEN`` when a
    client is attached, or back in the phase it came from (``NEW`` or ``DISCONNECTED``)
    when it fails.
``OPEN``
    A nats-py client is attached and accepts messages. Whether it is connected right
    now or reconnecting after losing its server is the client's own state; it is read
    from the client, never copied, and shows as ``CONNECTED`` or ``RECONNECTING`` in the
    public :class:`ClusterState`. Messages are accepted in both.
``DISCONNECTED``
    The client gave up for good (nats-py closed it, or the event loop it ran on ended,
    which also ends an attempt in progress);
    what it held was counted as dropped or kept for the next client. The next call
    connects again, through ``CONNECTING``.
``CLOSING``
    :meth:`Lifecycle.begin_close` was called, from any thread: from this moment new
    messages are refused with ``ClusterClosedError`` (the outbox is shut), producers
    waiting for room are woken and refused, and the event loop drains what was accepted
    before, bounded by the close deadline.
``CLOSED``
    For good. Whatever could not be delivered has been counted as dropped and logged.

A forked child does not use its parent's phase at all: the blocking facade builds a
new cluster in the child on first use.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from typing import Any

from .._errors import ClusterClosedError
from .._forksafe import renew_after_fork

__all__ = ("ClusterState", "Lifecycle", "Phase")


class ClusterState(enum.Enum):
    """Where a :class:`~openfactory_nats.NatsCluster` stands.

    ``NEW`` until the first connection; ``CONNECTING`` while a connection is being made;
    ``CONNECTED``; ``RECONNECTING`` while nats-py buffers and retries after losing its
    server; ``DISCONNECTED`` once nats-py gave up for good (the next call connects
    again); ``CLOSING`` while draining; ``CLOSED`` for good.
    """

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    DISCONNECTED = "disconnected"
    CLOSING = "closing"
    CLOSED = "closed"


class Phase(enum.Enum):
    """The library's own part of the state (see the module docstring)."""

    NEW = "new"
    CONNECTING = "connecting"
    OPEN = "open"
    DISCONNECTED = "disconnected"
    CLOSING = "closing"
    CLOSED = "closed"


_ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.NEW: frozenset({Phase.CONNECTING, Phase.CLOSING}),
    Phase.CONNECTING: frozenset({Phase.OPEN, Phase.NEW, Phase.DISCONNECTED, Phase.CLOSING}),
    Phase.OPEN: frozenset({Phase.DISCONNECTED, Phase.CLOSING}),
    Phase.DISCONNECTED: frozenset({Phase.CONNECTING, Phase.CLOSING}),
    Phase.CLOSING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


class Lifecycle:
    """The phase of one cluster, and the only code that changes it.

    :param cluster: the cluster name, for messages.
    :param logger: receives a DEBUG line per transition.
    :param on_close: called once, in the thread that starts closing, to refuse new
        messages from then on (the outbox's shut-down).
    """

    def __init__(self, cluster: str, logger: logging.Logger, on_close: Callable[[], Any]) -> None:
        self.cluster = cluster
        self._logger = logger
        self._on_close = on_close
        self._lock = threading.Lock()
        #: The current phase; read it freely, change it only through the methods below.
        self.phase = Phase.NEW
        self._ever_open = False
        renew_after_fork(self)

    def _renew_after_fork(self) -> None:
        self._lock = threading.Lock()

    def _move(self, to: Phase) -> Phase:
        previous = self.phase
        if to not in _ALLOWED[previous]:
            raise RuntimeError(f"cluster {self.cluster!r}: no transition from {previous.value} to {to.value}")
        self.phase = to
        self._logger.debug("cluster %s: %s -> %s", self.cluster, previous.value, to.value)
        return previous

    # -- questions -------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        """True while a client is attached and messages are accepted."""
        return self.phase is Phase.OPEN

    @property
    def closing(self) -> bool:
        """True once closing has started (``CLOSING`` or ``CLOSED``)."""
        return self.phase is Phase.CLOSING or self.phase is Phase.CLOSED

    def check_open(self) -> None:
        """:raises ClusterClosedError: once closing has started."""
        if self.phase is Phase.CLOSING or self.phase is Phase.CLOSED:
            raise ClusterClosedError(f"cluster {self.cluster!r} is closed", cluster=self.cluster)

    def state(self, connected: bool, reconnecting: bool) -> ClusterState:
        """The public state, given what the attached client says of itself."""
        phase = self.phase
        if phase is Phase.OPEN:
            if connected:
                return ClusterState.CONNECTED
            return ClusterState.RECONNECTING if reconnecting else ClusterState.CONNECTING
        return _PUBLIC[phase]

    # -- transitions -------------------------------------------------------------------
    def begin_connect(self) -> Phase | None:
        """Start a connection attempt; return the phase to fall back to if it fails, or
        None when a client is already attached (nothing to do).

        :raises ClusterClosedError: once closing has started.
        """
        with self._lock:
            self.check_open()
            if self.phase is Phase.OPEN:
                return None
            return self._move(Phase.CONNECTING)

    def connected(self) -> None:
        """The attempt attached a client.

        :raises ClusterClosedError: when closing started meanwhile (the caller then
            discards the client).
        """
        with self._lock:
            self.check_open()
            self._move(Phase.OPEN)
            self._ever_open = True

    def connect_failed(self, fallback: Phase) -> None:
        """The attempt failed: back to *fallback* (unless closing started meanwhile)."""
        with self._lock:
            if self.phase is Phase.CONNECTING:
                self._move(fallback)

    def loop_ended(self) -> None:
        """The event loop the client ran on has ended (``asyncio.run`` per call): an
        attached client or an attempt in progress is gone; the next call connects."""
        with self._lock:
            if self.phase is Phase.OPEN or self.phase is Phase.CONNECTING:
                self._move(Phase.DISCONNECTED if self._ever_open else Phase.NEW)

    def lost(self) -> bool:
        """The attached client is gone for good; True if this changed the phase."""
        with self._lock:
            if self.phase is not Phase.OPEN:
                return False
            self._move(Phase.DISCONNECTED)
            return True

    def begin_close(self) -> bool:
        """Start closing (any thread); True for the call that started it. New messages
        are refused from the moment this returns."""
        with self._lock:
            if self.phase is Phase.CLOSING or self.phase is Phase.CLOSED:
                return False
            self._move(Phase.CLOSING)
        self._on_close()
        return True

    def closed(self) -> None:
        """Closing is over."""
        with self._lock:
            if self.phase is Phase.CLOSING:
                self._move(Phase.CLOSED)

    @property
    def ever_open(self) -> bool:
        """True once a client was attached (the server's limits are known)."""
        return self._ever_open


_PUBLIC = {
    Phase.NEW: ClusterState.NEW,
    Phase.CONNECTING: ClusterState.CONNECTING,
    Phase.DISCONNECTED: ClusterState.DISCONNECTED,
    Phase.CLOSING: ClusterState.CLOSING,
    Phase.CLOSED: ClusterState.CLOSED,
}
