"""The hash ring: placement identical to the router service's, and consistent."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openfactory_nats import HashRing


def brute_force_owner(nodes: list[str], key: str, replicas: int = 128) -> str:
    """An independent reading of the algorithm: no bisect, no sorting of the ring."""

    def digest(data: bytes) -> int:
        return int(hashlib.sha256(data).hexdigest(), 16)

    position = digest(key.encode("utf-8"))
    points = [(digest(f"{n}::{i}".encode()), n) for n in nodes for i in range(replicas)]
    after = [p for p in points if p[0] > position]
    return min(after)[1] if after else min(points)[1]


# Computed with brute_force_owner (nodes C1, C2, C3 with 128 and 16 replicas; C1..C4).
VECTORS = [
    ("0b7d3f58-5c1e-4a53-9f0e-2d1c6f8a9b10", "C1", "C3", "C1"),
    ("asset-1", "C2", "C1", "C2"),
    ("asset-2", "C1", "C1", "C1"),
    ("", "C2", "C3", "C2"),
    ("ü-asset", "C1", "C3", "C1"),
    ("a4f0c2e1-0000-4000-8000-000000000000", "C3", "C3", "C4"),
    ("WTVB01-001", "C2", "C1", "C2"),
    ("PROVER3018", "C2", "C2", "C2"),
]


@pytest.mark.parametrize(("key", "three", "three_16", "four"), VECTORS)
def test_fixed_vectors(key: str, three: str, three_16: str, four: str) -> None:
    assert HashRing(["C1", "C2", "C3"]).get(key) == three
    assert HashRing(["C3", "C1", "C2"], replicas=16).get(key) == three_16
    assert HashRing(["C1", "C2", "C3", "C4"]).get(key) == four
    assert HashRing(["C1", "C2", "C3"]).get(key.encode()) == three


@given(st.text(max_size=40), st.integers(min_value=1, max_value=8))
def test_matches_the_brute_force_reading(key: str, replicas: int) -> None:
    nodes = ["C1", "C2", "C3"]
    assert HashRing(nodes, replicas).get(key) == brute_force_owner(nodes, key, replicas)


def test_adding_a_cluster_moves_about_a_quarter_of_keys_all_to_it() -> None:
    keys = [str(uuid.UUID(int=i * 7919 + 1)) for i in range(20_000)]
    three = HashRing(["C1", "C2", "C3"])
    four = HashRing(["C1", "C2", "C3", "C4"])
    moved = [k for k in keys if three.get(k) != four.get(k)]
    assert all(four.get(k) == "C4" for k in moved)
    assert 0.18 < len(moved) / len(keys) < 0.32


def test_bad_rings_and_keys_are_refused() -> None:
    with pytest.raises(ValueError):
        HashRing([])
    with pytest.raises(ValueError):
        HashRing(["C1"], replicas=0)
    with pytest.raises(ValueError):
        HashRing(["C1", "C1"])
    with pytest.raises(TypeError):
        HashRing(["C1"]).get(42)  # type: ignore[arg-type]
    assert HashRing(["only"]).get("anything") == "only"
