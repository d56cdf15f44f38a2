"""Partitioning: key placement (mod-N, consistent hashing, rendezvous, jump), a directory of
overrides for hot keys, rebalance plans and skew (guide §17, ADR 0043)."""

from mercato.kit.partitioning.directory import Directory, Move, RebalancePlan, loads, plan_rebalance, skew
from mercato.kit.partitioning.placement import (
    Algorithm,
    ConsistentHashRing,
    JumpHash,
    ModN,
    Placement,
    Rendezvous,
    jump_bucket,
    make_placement,
    stable_hash64,
)

__all__ = [
    "Algorithm",
    "ConsistentHashRing",
    "Directory",
    "JumpHash",
    "ModN",
    "Move",
    "Placement",
    "RebalancePlan",
    "Rendezvous",
    "jump_bucket",
    "loads",
    "make_placement",
    "plan_rebalance",
    "skew",
    "stable_hash64",
]
