"""A directory in front of a placement (hot keys pinned to a node), rebalance plans and skew.

`Directory.owner(key)` answers an override first (a hot key given a node of its own, guide §17
"directory-based"), then the hash placement. `plan_rebalance` lists exactly the keys whose owner
differs between two directories: only those move.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mercato.kit.partitioning.placement import Placement

__all__ = ["Directory", "Move", "RebalancePlan", "loads", "plan_rebalance", "skew"]


class Directory:
    def __init__(self, placement: Placement, overrides: Mapping[str, str] | None = None) -> None:
        self.placement = placement
        self.overrides = dict(overrides or {})
        unknown = set(self.overrides.values()) - set(placement.nodes)
        if unknown:
            raise ValueError(f"overrides name unknown nodes: {sorted(unknown)}")

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.placement.nodes

    def owner(self, key: str) -> str:
        pinned = self.overrides.get(key)
        return pinned if pinned is not None else self.placement.owner(key)


@dataclass(frozen=True)
class Move:
    key: str
    source: str
    target: str


@dataclass(frozen=True)
class RebalancePlan:
    """The keys whose owner changes from `before` to `after`, and how many keys were looked at."""

    moves: tuple[Move, ...]
    keys_total: int
    by_pair: Mapping[tuple[str, str], int] = field(default_factory=dict)

    @property
    def moved_fraction(self) -> float:
        return len(self.moves) / self.keys_total if self.keys_total else 0.0


def plan_rebalance(
    keys: Iterable[str], before: Directory | Placement, after: Directory | Placement
) -> RebalancePlan:
    moves: list[Move] = []
    total = 0
    pairs: Counter[tuple[str, str]] = Counter()
    for key in keys:
        total += 1
        source, target = before.owner(key), after.owner(key)
        if source != target:
            moves.append(Move(key, source, target))
            pairs[(source, target)] += 1
    return RebalancePlan(tuple(moves), total, dict(pairs))


def loads(
    keys: Iterable[str], placement: Directory | Placement, weights: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Load per node: each key counts 1 (or its weight: requests, bytes) on its owner."""
    out = dict.fromkeys(placement.nodes, 0.0)
    for key in keys:
        out[placement.owner(key)] += 1.0 if weights is None else weights.get(key, 0.0)
    return out


def skew(per_node: Mapping[str, float]) -> float:
    """Max over mean (1.0 = perfectly even); 0.0 when there is no load at all."""
    values = list(per_node.values())
    if not values:
        return 0.0
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else 0.0
