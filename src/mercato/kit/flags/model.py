"""Flag definitions: typed, validated before a configuration version is accepted.

A flag has named variants (a boolean flag: `on`/`off` with values true/false; a multivariate flag: any
names and JSON values) and decides per evaluation context in this order:

1. `enabled = false` (the kill switch): `off_variant`, whatever else the flag says.
2. The first targeting rule whose every condition holds (roles, tenants, customer ids, release tracks).
3. The percentage rollout: the customer's stable bucket (0..9999, a hash of flag key, salt and the
   targeting key) falls in one variant's slice of the weights (basis points summing to 10 000).
4. `default_variant`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["FlagRule", "FlagSpec", "RolloutSlice", "boolean_flag"]

BUCKETS = 10_000  # basis points: 0.01 % resolution


class FlagRule(BaseModel):
    """Every listed condition must hold (an empty list is no condition)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str
    roles: frozenset[str] = frozenset()
    tenants: frozenset[str] = frozenset()
    customers: frozenset[str] = frozenset()
    tracks: frozenset[str] = frozenset()  # the release track of the serving process (stable, canary)


class RolloutSlice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str
    percent: float = Field(ge=0, le=100)


class FlagSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["boolean", "multivariate"] = "boolean"
    description: str = ""
    enabled: bool = True
    variants: dict[str, Any] = Field(default_factory=lambda: {"on": True, "off": False})
    default_variant: str = "off"
    off_variant: str = "off"
    rules: tuple[FlagRule, ...] = ()
    rollout: tuple[RolloutSlice, ...] = ()
    # Changing the salt reshuffles who falls in which slice (a fresh experiment); keep it to keep them.
    salt: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> FlagSpec:
        names = set(self.variants)
        if not names:
            raise ValueError("a flag needs at least one variant")
        if self.kind == "boolean" and (names != {"on", "off"} or self.variants != {"on": True, "off": False}):
            raise ValueError("a boolean flag's variants are exactly {on: true, off: false}")
        used = [self.default_variant, self.off_variant]
        used += [rule.variant for rule in self.rules] + [s.variant for s in self.rollout]
        unknown = sorted({v for v in used if v not in names})
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; the flag has {sorted(names)}")
        total = sum(s.percent for s in self.rollout)
        if total > 100 + 1e-9:
            raise ValueError(f"rollout percentages add up to {total}, more than 100")
        return self


def boolean_flag(*, percent: float = 0.0, enabled: bool = True, **extra: Any) -> FlagSpec:
    """A boolean flag on for `percent` % of customers (the rest: off)."""
    return FlagSpec(enabled=enabled, rollout=(RolloutSlice(variant="on", percent=percent),), **extra)
