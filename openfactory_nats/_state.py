"""The life-cycle states of a cluster connection."""

from __future__ import annotations

import enum

__all__ = ("ClusterState",)


class ClusterState(enum.Enum):
    """Where a :class:`~openfactory_nats.NatsCluster` stands.

    ``NEW`` until the first connection; ``CONNECTING`` while the first connection (or a
    replacement) is being made; ``CONNECTED``; ``RECONNECTING`` while nats-py buffers and
    retries after losing its server; ``DISCONNECTED`` once nats-py gave up for good (the
    next call connects again); ``CLOSING`` while draining; ``CLOSED`` for good.
    """

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    DISCONNECTED = "disconnected"
    CLOSING = "closing"
    CLOSED = "closed"
