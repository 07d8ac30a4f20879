"""The cores alive in this process, for exporters that report on all of them
(:mod:`openfactory_nats.prometheus`).

Every :class:`~openfactory_nats.NatsCluster` adds itself here when it is constructed,
which covers the cores of :class:`~openfactory_nats.SyncNatsCluster` and of both routers.
The set holds weak references only: it never keeps an instance alive. A forked child
starts with an empty set (with a new lock, in case a parent thread held the old one at
the fork): the cores it inherited belong to the parent, and an instance used in the child
gets a core of its own, which is tracked again.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Protocol

from .lifecycle import ClusterState

__all__ = ("Reporting", "live", "track")


class Reporting(Protocol):
    """What an exporter reads of a core."""

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> ClusterState: ...

    def stats(self) -> dict[str, int]: ...


_lock = threading.Lock()
_live: weakref.WeakSet[Reporting] = weakref.WeakSet()


def track(core: Reporting) -> None:
    """Remember *core* (weakly) until it is garbage-collected."""
    with _lock:
        _live.add(core)


def live() -> list[Reporting]:
    """The cores alive now that were made in this process."""
    with _lock:  # a WeakSet cannot be iterated while another thread adds to it
        return list(_live)


def _forget_the_parents() -> None:
    global _lock, _live
    _lock = threading.Lock()
    _live = weakref.WeakSet()


os.register_at_fork(after_in_child=_forget_the_parents)
