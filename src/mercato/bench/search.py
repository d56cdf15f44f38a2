"""Finding the maximum sustainable rate: grow geometrically until a step fails, then bisect.

The search only decides *which rate to try next* from the pass/fail verdicts it is told; running a
step is someone else's job, so the logic is tested without a server.

1. Ramp: ``start, start * growth, start * growth^2, ...`` (capped at ``max_rate``) until a step fails.
   If the very first step fails, ramp *down* (``start / growth, ...``, ``min_rate`` last) until one
   passes.
2. Bisect between the highest passing rate ``lo`` and the lowest failing rate ``hi`` while
   ``hi / lo - 1 > precision``.

It stops after ``max_steps`` steps in any case. With an explicit ``rates`` list it tries exactly
those rates, in ascending order, and reports the highest that passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SearchPolicy:
    start_rate: float = 250.0
    growth: float = 2.0
    precision: float = 0.05
    min_rate: float = 10.0
    max_rate: float = 50_000.0
    max_steps: int = 14

    def __post_init__(self) -> None:
        if self.growth <= 1.0:
            raise ValueError("growth must be greater than 1")
        if self.precision <= 0:
            raise ValueError("precision must be positive")
        if not 0 < self.min_rate <= self.start_rate <= self.max_rate:
            raise ValueError("need 0 < min_rate <= start_rate <= max_rate")
        if self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")


@dataclass(slots=True)
class RateSearch:
    """A stateful search: ask ``next_rate()``, run that step, tell ``record(rate, passed)``."""

    policy: SearchPolicy = field(default_factory=SearchPolicy)
    rates: Sequence[float] | None = None
    history: list[tuple[float, bool]] = field(default_factory=list)

    @property
    def best(self) -> float | None:
        """The highest rate that passed so far (``None`` if none did)."""
        passed = [rate for rate, ok in self.history if ok]
        return max(passed) if passed else None

    @property
    def lowest_failure(self) -> float | None:
        failed = [rate for rate, ok in self.history if not ok]
        return min(failed) if failed else None

    def record(self, rate: float, passed: bool) -> None:
        self.history.append((rate, passed))

    def next_rate(self) -> float | None:
        """The next rate to try, or ``None`` when the search is over."""
        if self.rates is not None:
            ladder = sorted(self.rates)
            return ladder[len(self.history)] if len(self.history) < len(ladder) else None
        p = self.policy
        if len(self.history) >= p.max_steps:
            return None
        if not self.history:
            return p.start_rate
        lo, hi = self.best, self.lowest_failure
        if hi is None:  # everything passed so far: keep ramping up
            assert lo is not None
            if lo >= p.max_rate:
                return None
            return min(p.max_rate, lo * p.growth)
        if lo is None:  # everything failed so far: ramp down, trying min_rate last
            if hi <= p.min_rate:
                return None
            return max(p.min_rate, hi / p.growth)
        if hi <= lo or hi / lo - 1 <= p.precision:
            return None
        return (lo + hi) / 2
