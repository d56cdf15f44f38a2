"""In-process backend: the pure cores over a dict. For one process (embedded mode, tests, a local guard).

Each decision is O(1) (the sliding log is O(rate)) and runs without an `await`, so on one event loop it is
atomic without a lock. Memory stays bounded: every state carries the TTL its core computed (after which it
is equivalent to a fresh key), keys are kept in least-recently-used order, each decision drops up to two
expired keys from the cold end, and `max_keys` caps the table (evicting the least recently used key, which
resets that key's quota: the price of a hard memory bound).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.ratelimit.algorithms import AlgorithmCore, check_cost
from mercato.kit.ratelimit.limit import Decision, Limit
from mercato.kit.ratelimit.metrics import NoMetrics, RateLimitMetrics

__all__ = ["MemoryLimiter"]

S = TypeVar("S")

# Expired keys dropped per decision: more than one, so the sweep outpaces the arrival of new keys.
_SWEEP_PER_DECISION = 2


class MemoryLimiter(Generic[S]):
    def __init__(
        self,
        core: AlgorithmCore[S],
        *,
        clock: Clock | None = None,
        max_keys: int = 100_000,
        metrics: RateLimitMetrics | None = None,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._core = core
        # Monotonic time: a wall-clock step backwards must not hand out a fresh quota.
        self._clock: Clock = clock or SystemClock()
        self._max_keys = max_keys
        self._metrics: RateLimitMetrics = metrics or NoMetrics()
        self._states: OrderedDict[str, tuple[S, float]] = OrderedDict()

    @property
    def algorithm(self) -> str:
        return self._core.name

    @property
    def backend(self) -> str:
        return "memory"

    def __len__(self) -> int:
        """Keys currently held (expired ones may linger until swept)."""
        return len(self._states)

    async def hit(self, key: str, limit: Limit, *, cost: int = 1) -> Decision:
        check_cost(cost, capacity=self._core.capacity(limit))
        decision = self._decide(key, limit, cost=cost, commit=True)
        outcome = "allowed" if decision.allowed else "limited"
        self._metrics.decision(algorithm=self.algorithm, backend="memory", outcome=outcome)
        return decision

    async def peek(self, key: str, limit: Limit) -> Decision:
        return self._decide(key, limit, cost=1, commit=False)

    def _load(self, key: str, limit: Limit, now_s: float) -> S:
        self._sweep(now_s)
        held = self._states.get(key)
        if held is None or held[1] <= now_s:
            return self._core.initial(now_s=now_s, limit=limit)
        return held[0]

    def _store(self, key: str, state: S, *, now_s: float, ttl_s: float) -> None:
        self._states[key] = (state, now_s + ttl_s)
        self._states.move_to_end(key)
        while len(self._states) > self._max_keys:
            self._states.popitem(last=False)

    def _decide(self, key: str, limit: Limit, *, cost: int, commit: bool) -> Decision:
        now_s = self._clock.monotonic()
        state = self._load(key, limit, now_s)
        step = self._core.decide(state, now_s=now_s, limit=limit, cost=cost, commit=commit)
        if commit and step.state is not state:
            self._store(key, step.state, now_s=now_s, ttl_s=step.ttl_s)
        return step.decision

    def _sweep(self, now_s: float) -> None:
        for _ in range(_SWEEP_PER_DECISION):
            if not self._states:
                return
            key, (_, expires_s) = next(iter(self._states.items()))
            if expires_s > now_s:
                return
            del self._states[key]
