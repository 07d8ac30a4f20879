"""Locks and other per-process state renewed in a forked child.

A lock inherited through ``fork()`` may have been held by a parent thread that does not
exist in the child, and would then never be released. Objects that own such state
register here and get their ``_renew_after_fork()`` called in the child, before any
other code of the child runs.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

__all__ = ("renew_after_fork",)


class _Renewable(Protocol):
    def _renew_after_fork(self) -> None: ...


_registered: weakref.WeakSet[_Renewable] = weakref.WeakSet()


def renew_after_fork(obj: _Renewable) -> None:
    """Call ``obj._renew_after_fork()`` in every forked child while *obj* is alive."""
    _registered.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_registered):
        obj._renew_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
