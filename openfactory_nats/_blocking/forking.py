"""A blocking instance in a forked child.

What a child inherits from its parent (the core, its loop thread, its subscriptions)
belongs to the parent: at the fork, each live instance is told (:func:`track`), renews
the locks a parent thread may have held, and marks itself forked; on first use it leaves
what it inherited to the parent (:func:`leave_to_parent`) and makes its own.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

from .._core.cluster import NatsCluster
from .._core.lifecycle import ClusterState
from .loop import LoopThread, keep_inherited

__all__ = ("leave_to_parent", "track")


class _Forkable(Protocol):
    def _after_fork_in_child(self) -> None: ...


_instances: weakref.WeakSet[_Forkable] = weakref.WeakSet()


def track(instance: _Forkable) -> None:
    """Call ``instance._after_fork_in_child()`` in every forked child while it is alive."""
    _instances.add(instance)


def leave_to_parent(runner: LoopThread, core: NatsCluster) -> bool:
    """(A forked child, first use) Keep what the parent's *runner* and *core* hold alive
    and untouched, say which subscriptions do not deliver here, and return whether the
    core was closing (the new one is then closed too)."""
    keep_inherited(runner, core)
    inherited = len(core.incoming.sinks(internal=False))
    if inherited:
        core.logger.warning(
            "cluster %s: %d subscription(s) made by the parent process do not deliver in this "
            "forked child; subscribe again here",
            core.name,
            inherited,
        )
    return core.state in (ClusterState.CLOSING, ClusterState.CLOSED)


def _after_fork_in_child() -> None:
    for instance in list(_instances):
        instance._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
