"""Breakers by dependency name, and the JSON-able snapshot an admin endpoint serves."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from random import Random

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.resilience.breaker import BreakerConfig, BreakerSnapshot, CircuitBreaker
from mercato.kit.resilience.hooks import BreakerHooks

__all__ = ["BreakerRegistry"]


class BreakerRegistry:
    """One `CircuitBreaker` per dependency, sharing a clock, a `Random` (for the open waits' jitter)
    and hooks; created on first use."""

    def __init__(
        self,
        *,
        defaults: BreakerConfig | None = None,
        clock: Clock | None = None,
        rng: Random | None = None,
        hooks: Sequence[BreakerHooks] = (),
    ) -> None:
        self._defaults = defaults or BreakerConfig()
        self._clock: Clock = clock or SystemClock()
        self._rng = rng or Random()
        self._hooks = tuple(hooks)
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str, *, config: BreakerConfig | None = None) -> CircuitBreaker:
        """The breaker for `name`, created with `config` (or the defaults) the first time."""
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = CircuitBreaker(
                name, config=config or self._defaults, clock=self._clock, rng=self._rng, hooks=self._hooks
            )
            self._breakers[name] = breaker
        return breaker

    def add_hooks(self, *hooks: BreakerHooks) -> None:
        """Subscribe more hooks to every breaker, those made so far and those still to come."""
        self._hooks = (*self._hooks, *hooks)
        for breaker in self._breakers.values():
            breaker.add_hooks(*hooks)

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return iter(list(self._breakers.values()))

    def __len__(self) -> int:
        return len(self._breakers)

    def snapshot(self) -> dict[str, BreakerSnapshot]:
        """`{dependency: snapshot}` sorted by name, ready for `json.dumps`."""
        return {name: self._breakers[name].snapshot() for name in sorted(self._breakers)}
