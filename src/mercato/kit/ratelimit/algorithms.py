"""Pure algorithm cores: `(state, now) -> (new state, decision)`. No I/O, no clock, no locks.

The memory backend stores these states in a dict; the Lua scripts in `lua/` implement the same maths line
for line (same operations in the same order, so both give bit-identical floats for the same inputs). The
tests use them as the system under test and check them against independent reference models.

Conventions shared by every core:
- `now_s` is seconds on any clock that does not go backwards (elapsed time is clamped at 0 anyway).
- `commit=False` evaluates without consuming (`peek`): the state is returned unchanged.
- A refused hit consumes nothing and leaves the state unchanged.
- `ttl_s` is how long the state stays meaningful: after it, the state is equivalent to a fresh one, so a
  backend may forget it (memory eviction, Redis PEXPIRE) without changing any later decision.
- Comparisons allow `EPSILON` so that float rounding (e.g. `3 * (1/3)`) never refuses what exact
  arithmetic would admit; with times in seconds it is far below any clock's resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from mercato.kit.ratelimit.limit import Decision, Limit

__all__ = [
    "ALGORITHMS",
    "EPSILON",
    "AlgorithmCore",
    "FixedWindow",
    "GcraState",
    "LeakyBucket",
    "LogState",
    "SlidingLog",
    "SlidingWindowCounter",
    "SlidingWindowState",
    "Step",
    "TokenBucket",
    "TokenState",
    "WindowState",
    "check_cost",
]

EPSILON = 1e-9

S = TypeVar("S")


class Step(NamedTuple, Generic[S]):
    # Tuples, not frozen dataclasses: one is built per decision, and a tuple is built several times faster.
    state: S
    decision: Decision
    ttl_s: float


class AlgorithmCore(Protocol[S]):
    name: str

    def initial(self, *, now_s: float, limit: Limit) -> S:
        """The state of a key never seen (or forgotten after its TTL)."""
        ...

    def decide(self, state: S, *, now_s: float, limit: Limit, cost: int, commit: bool) -> Step[S]: ...

    def capacity(self, limit: Limit) -> int:
        """The most units one decision may ask for; more could never be admitted."""
        ...


def check_cost(cost: int, *, capacity: int) -> None:
    """Refuse a cost that no amount of waiting could satisfy: it is a caller bug, not a 429."""
    if cost < 1 or cost > capacity:
        raise ValueError(f"cost must be between 1 and {capacity}, got {cost}")


# --- token bucket ------------------------------------------------------------------------------------------


class TokenState(NamedTuple):
    tokens: float
    updated_s: float


class TokenBucket:
    """Token bucket: capacity `C = burst`, refill `r = rate / period_s` tokens per second.

    `tokens(now) = min(C, tokens + max(0, now - updated) * r)`; admit when `tokens >= cost`, then
    `tokens -= cost`. Over any interval of length `t` it admits at most `C + r * t` units, and a fresh bucket
    admits exactly `C` at once. `reset_after = (C - tokens) / r`, `retry_after = (cost - tokens) / r`.
    """

    name = "token_bucket"

    def initial(self, *, now_s: float, limit: Limit) -> TokenState:
        return TokenState(float(limit.capacity), now_s)

    def capacity(self, limit: Limit) -> int:
        return limit.capacity

    def decide(
        self, state: TokenState, *, now_s: float, limit: Limit, cost: int, commit: bool
    ) -> Step[TokenState]:
        cap = float(limit.capacity)
        per_s = limit.rate / limit.period_s
        elapsed = max(0.0, now_s - state.updated_s)
        tokens = min(cap, state.tokens + elapsed * per_s)
        allowed = tokens + EPSILON >= cost
        new_state = state
        if allowed and commit:
            tokens = max(0.0, tokens - cost)
            new_state = TokenState(tokens, now_s)
        reset_after = (cap - tokens) / per_s
        retry_after = 0.0 if allowed else (cost - tokens) / per_s
        decision = Decision(allowed, limit.capacity, math.floor(tokens + EPSILON), reset_after, retry_after)
        return Step(new_state, decision, reset_after)


# --- leaky bucket (GCRA) -----------------------------------------------------------------------------------


class GcraState(NamedTuple):
    """TAT: the theoretical arrival time at which the bucket will be empty again."""

    tat_s: float


class LeakyBucket:
    """Leaky bucket as a meter (GCRA, virtual scheduling).

    Emission interval `T = period_s / rate`, tolerance `tau = burst * T`. With `tat' = max(tat, now)` and
    `new_tat = tat' + cost * T`:
    - meter: admit when `new_tat - now <= tau`; a fresh key admits `burst` at once, then one unit every `T`.
      `remaining = floor((tau - (tat' - now)) / T)`, `reset_after = tat' - now`,
      `retry_after = new_tat - tau - now`.
    """

    name = "leaky_bucket"

    def initial(self, *, now_s: float, limit: Limit) -> GcraState:
        return GcraState(now_s)

    def capacity(self, limit: Limit) -> int:
        return limit.capacity

    def decide(
        self, state: GcraState, *, now_s: float, limit: Limit, cost: int, commit: bool
    ) -> Step[GcraState]:
        interval = limit.period_s / limit.rate
        tau = limit.capacity * interval
        tat = max(state.tat_s, now_s)
        new_tat = tat + cost * interval
        allowed = new_tat - now_s <= tau + EPSILON
        new_state = state
        if allowed and commit:
            tat = new_tat
            new_state = GcraState(new_tat)
        remaining = max(0, math.floor((tau - (tat - now_s)) / interval + EPSILON))
        retry_after = 0.0 if allowed else new_tat - tau - now_s
        decision = Decision(allowed, limit.capacity, remaining, tat - now_s, retry_after)
        return Step(new_state, decision, tat - now_s)


# --- fixed window ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WindowState:
    window: int
    count: int


class FixedWindow:
    """Fixed window: window `w = floor(now / period_s)`; admit when `count(w) + cost <= rate`.

    `reset_after = retry_after = (w + 1) * period_s - now`. Known weakness (kept, and tested): a client can
    get `rate` units at the end of one window and `rate` more at the start of the next, i.e. up to
    `2 * rate` within one period that straddles the boundary.
    """

    name = "fixed_window"

    def initial(self, *, now_s: float, limit: Limit) -> WindowState:
        return WindowState(math.floor(now_s / limit.period_s), 0)

    def capacity(self, limit: Limit) -> int:
        return limit.rate

    def decide(
        self, state: WindowState, *, now_s: float, limit: Limit, cost: int, commit: bool
    ) -> Step[WindowState]:
        window = math.floor(now_s / limit.period_s)
        count = state.count if state.window == window else 0
        allowed = count + cost <= limit.rate
        new_state = state
        if allowed and commit:
            count = count + cost
            new_state = WindowState(window, count)
        reset_after = max(0.0, (window + 1) * limit.period_s - now_s)
        retry_after = 0.0 if allowed else reset_after
        decision = Decision(allowed, limit.rate, limit.rate - count, reset_after, retry_after)
        return Step(new_state, decision, reset_after)


# --- sliding window counter --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlidingWindowState:
    window: int
    previous: int
    current: int


class SlidingWindowCounter:
    """Sliding window counter: two fixed windows, the previous one weighted by how much of it still overlaps.

    With `e = now - w * period_s` the time into the current window and `weight = 1 - e / period_s`:
    `estimate = previous * weight + current`; admit when `estimate + cost <= rate`. O(1) memory, and an
    approximation: it assumes the previous window's units were spread evenly. The true count in the last
    period is bounded by `rate + previous * e / period_s < 2 * rate`, and never exceeds `rate` within one
    fixed window. `retry_after` solves `estimate(now + retry) + cost = rate` (this window or the next).
    """

    name = "sliding_window"

    def initial(self, *, now_s: float, limit: Limit) -> SlidingWindowState:
        return SlidingWindowState(math.floor(now_s / limit.period_s), 0, 0)

    def capacity(self, limit: Limit) -> int:
        return limit.rate

    def decide(
        self, state: SlidingWindowState, *, now_s: float, limit: Limit, cost: int, commit: bool
    ) -> Step[SlidingWindowState]:
        period = limit.period_s
        window = math.floor(now_s / period)
        if state.window == window:
            previous, current = state.previous, state.current
        elif state.window == window - 1:
            previous, current = state.current, 0
        else:
            previous, current = 0, 0
        elapsed = min(period, max(0.0, now_s - window * period))
        weight = 1.0 - elapsed / period
        allowed = previous * weight + current + cost <= limit.rate + EPSILON
        new_state = state
        if allowed and commit:
            current = current + cost
            new_state = SlidingWindowState(window, previous, current)
        remaining = max(0, math.floor(limit.rate - (previous * weight + current) + EPSILON))
        if current > 0:
            reset_after = 2 * period - elapsed
        elif previous > 0:
            reset_after = period - elapsed
        else:
            reset_after = 0.0
        retry_after = 0.0
        if not allowed:
            need = limit.rate - cost
            at = period
            if previous > 0 and current <= need:
                at = period * (1.0 - (need - current) / previous)
            if at < period:
                retry_after = max(0.0, at - elapsed)
            else:
                later = max(0.0, period * (1.0 - need / current)) if current > 0 else 0.0
                retry_after = (period - elapsed) + later
        decision = Decision(allowed, limit.rate, remaining, reset_after, retry_after)
        return Step(new_state, decision, 2 * period - elapsed)


# --- sliding log -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogState:
    """Timestamps of the admitted units still inside the period, oldest first; never more than `rate`."""

    stamps: tuple[float, ...]


class SlidingLog:
    """Sliding log: keep one timestamp per admitted unit; forget those with `stamp <= now - period_s`.

    Admit when `len(log) + cost <= rate`: exact, never more than `rate` in any period-long window, at
    O(rate) memory per key (the log is capped at `rate` entries because nothing beyond is ever admitted).
    `reset_after = newest + period_s - now`; a refused hit waits for the `(len + cost - rate)`-th oldest to
    expire: `retry_after = log[len + cost - rate - 1] + period_s - now`.
    """

    name = "sliding_log"

    def initial(self, *, now_s: float, limit: Limit) -> LogState:
        return LogState(())

    def capacity(self, limit: Limit) -> int:
        return limit.rate

    def decide(
        self, state: LogState, *, now_s: float, limit: Limit, cost: int, commit: bool
    ) -> Step[LogState]:
        cutoff = now_s - limit.period_s + EPSILON
        stamps = state.stamps
        first = 0
        while first < len(stamps) and stamps[first] <= cutoff:
            first += 1
        stamps = stamps[first:]
        count = len(stamps)
        allowed = count + cost <= limit.rate
        new_state = state if first == 0 else LogState(stamps)
        if allowed and commit:
            stamps = stamps + (now_s,) * cost
            new_state = LogState(stamps)
        if not commit:
            new_state = state
        # Clamped to [0, period]: with large clock values, `stamp + period - now` can round past period.
        period = limit.period_s
        reset_after = min(period, max(0.0, stamps[-1] + period - now_s)) if stamps else 0.0
        retry_after = 0.0
        if not allowed:
            retry_after = min(period, max(0.0, stamps[count + cost - limit.rate - 1] + period - now_s))
        decision = Decision(allowed, limit.rate, limit.rate - len(stamps), reset_after, retry_after)
        return Step(new_state, decision, reset_after)


ALGORITHMS: dict[str, AlgorithmCore[Any]] = {
    core.name: core
    for core in (TokenBucket(), LeakyBucket(), FixedWindow(), SlidingWindowCounter(), SlidingLog())
}
