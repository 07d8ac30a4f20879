"""Consistent hashing of asset keys onto clusters.

The placement must match, bit for bit, the router service deployed next to the asset
forwarders: each node ``name`` has ``replicas`` virtual positions, the SHA-256 digests of
``f"{name}::{i}"`` read as big-endian integers; a key (``str`` keys are UTF-8 encoded)
belongs to the first position strictly after the key's own digest, wrapping around.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

from .._errors import InvalidMessageError, InvalidTypeError

__all__ = ("HashRing",)

_CACHE_LIMIT = 65536


def _position(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


class HashRing:
    """A consistent-hash ring of named nodes.

    :param nodes: the node (cluster) names; order does not matter.
    :param replicas: virtual positions per node.
    :raises ValueError: for an empty node list or ``replicas < 1``.
    """

    def __init__(self, nodes: Iterable[str], replicas: int = 128) -> None:
        names = list(nodes)
        if not names:
            raise InvalidMessageError("a hash ring needs at least one node")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise InvalidMessageError(f"replicas must be a positive int, not {replicas!r}")
        if len(set(names)) != len(names):
            raise InvalidMessageError("node names must be unique")
        for name in names:
            if not isinstance(name, str) or not name:
                raise InvalidTypeError("node names must be non-empty str")
        self.nodes = tuple(names)
        self.replicas = replicas
        points = sorted((_position(f"{name}::{i}".encode()), name) for name in names for i in range(replicas))
        self._positions = [p for p, _ in points]
        self._owners = [n for _, n in points]
        # Asset keys repeat: remember recent placements instead of hashing every message.
        self._cache: dict[str | bytes, str] = {}

    def get(self, key: str | bytes) -> str:
        """The node that owns *key*.

        :raises TypeError: when *key* is neither ``str`` nor ``bytes``.
        """
        kind = type(key)
        if kind is str or kind is bytes:
            cached = self._cache.get(key)
            if cached is not None:
                return cached
        owner = self._place(key)
        if kind is str or kind is bytes:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = owner
        return owner

    def _place(self, key: object) -> str:
        if isinstance(key, str):
            data = key.encode("utf-8")
        elif isinstance(key, bytes | bytearray | memoryview):
            data = bytes(key)
        else:
            raise InvalidTypeError(f"key must be str or bytes, not {type(key).__name__}")
        index = bisect.bisect_right(self._positions, _position(data))
        return self._owners[index % len(self._owners)]

    def __repr__(self) -> str:
        return f"HashRing({list(self.nodes)!r}, replicas={self.replicas})"
