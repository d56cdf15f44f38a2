"""Key -> node placement: mod-N, consistent hashing with virtual nodes, rendezvous, jump hash.

Every placement hashes the key with one stable 64-bit hash (BLAKE2b, never Python's salted `hash`),
so every process of every version agrees on where a key lives.

- `ModN`: ``nodes[h(key) mod N]``. Going N -> N+1 moves about N/(N+1) of the keys (the baseline).
- `ConsistentHashRing`: each node owns `vnodes` points ``h(node#i)`` on a 2^64 ring; a key belongs to
  the first point clockwise of ``h(key)``. Adding a node moves about 1/(N+1) of the keys, all to it;
  the spread of load is about ``1/sqrt(vnodes)`` (Karger et al. 1997).
- `Rendezvous` (highest random weight): the node with the largest ``h(node:key)``; moves the same
  1/(N+1), perfectly even in expectation, costs O(N) per lookup.
- `JumpHash` (Lamping & Veach 2014): O(ln N), no memory, even; nodes are buckets 0..N-1, so a node
  can be added only at the end (removing one from the middle renumbers the rest).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from typing import Literal, Protocol

__all__ = [
    "Algorithm",
    "ConsistentHashRing",
    "JumpHash",
    "ModN",
    "Placement",
    "Rendezvous",
    "jump_bucket",
    "make_placement",
    "stable_hash64",
]

Algorithm = Literal["mod", "ring", "rendezvous", "jump"]
_MASK = (1 << 64) - 1


def stable_hash64(value: str) -> int:
    """64-bit BLAKE2b of the UTF-8 text: the same in every process, run and Python version."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")


class Placement(Protocol):
    """Where a key lives among `nodes` (names, in the order they were added)."""

    @property
    def nodes(self) -> tuple[str, ...]: ...

    def owner(self, key: str) -> str: ...


def _checked(nodes: Sequence[str]) -> tuple[str, ...]:
    names = tuple(nodes)
    if not names:
        raise ValueError("a placement needs at least one node")
    if len(set(names)) != len(names):
        raise ValueError("node names must be unique")
    return names


class ModN:
    def __init__(self, nodes: Sequence[str]) -> None:
        self._nodes = _checked(nodes)

    @property
    def nodes(self) -> tuple[str, ...]:
        return self._nodes

    def owner(self, key: str) -> str:
        return self._nodes[stable_hash64(key) % len(self._nodes)]


class ConsistentHashRing:
    def __init__(self, nodes: Sequence[str], *, vnodes: int = 160) -> None:
        if vnodes < 1:
            raise ValueError("vnodes must be >= 1")
        self._nodes = _checked(nodes)
        self.vnodes = vnodes
        points = sorted((stable_hash64(f"{node}#{i}"), node) for node in self._nodes for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._owners = [n for _, n in points]

    @property
    def nodes(self) -> tuple[str, ...]:
        return self._nodes

    def owner(self, key: str) -> str:
        index = bisect.bisect_right(self._hashes, stable_hash64(key))
        return self._owners[index % len(self._owners)]


class Rendezvous:
    def __init__(self, nodes: Sequence[str]) -> None:
        self._nodes = _checked(nodes)

    @property
    def nodes(self) -> tuple[str, ...]:
        return self._nodes

    def owner(self, key: str) -> str:
        return max(self._nodes, key=lambda node: (stable_hash64(f"{node}:{key}"), node))


def jump_bucket(key: int, buckets: int) -> int:
    """Lamping & Veach's jump consistent hash: a bucket in [0, buckets) for a 64-bit key."""
    if buckets < 1:
        raise ValueError("buckets must be >= 1")
    b, j = -1, 0
    key &= _MASK
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


class JumpHash:
    def __init__(self, nodes: Sequence[str]) -> None:
        self._nodes = _checked(nodes)

    @property
    def nodes(self) -> tuple[str, ...]:
        return self._nodes

    def owner(self, key: str) -> str:
        return self._nodes[jump_bucket(stable_hash64(key), len(self._nodes))]


def make_placement(algorithm: Algorithm, nodes: Sequence[str], *, vnodes: int = 160) -> Placement:
    if algorithm == "mod":
        return ModN(nodes)
    if algorithm == "ring":
        return ConsistentHashRing(nodes, vnodes=vnodes)
    if algorithm == "rendezvous":
        return Rendezvous(nodes)
    if algorithm == "jump":
        return JumpHash(nodes)
    raise ValueError(f"unknown placement algorithm {algorithm!r}")
