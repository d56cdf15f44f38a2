"""The breaker's half-open discipline, with a scripted inner limiter (no network: the logic only)."""

from __future__ import annotations

import asyncio

import pytest

from mercato.kit.clock import ManualClock
from mercato.kit.ratelimit import BackendError, BreakerState, Decision, Limit, ResilientLimiter

LIMIT = Limit(rate=2, period_s=1.0)


class Scripted:
    """Fails while `down`; otherwise admits. Optionally blocks until released, to hold a trial in flight."""

    algorithm = "token_bucket"
    backend = "scripted"

    def __init__(self) -> None:
        self.down = True
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def hit(self, key: str, limit: Limit, *, cost: int = 1) -> Decision:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise BackendError("down")
        return Decision(True, limit.capacity, limit.capacity - cost, 0.5, 0.0)

    async def peek(self, key: str, limit: Limit) -> Decision:
        return await self.hit(key, limit)


async def test_half_open_lets_exactly_one_trial_through_and_a_cancelled_trial_frees_the_slot() -> None:
    clock, inner = ManualClock(), Scripted()
    limiter = ResilientLimiter(inner, fail_open=False, failure_threshold=2, reset_timeout_s=1.0, clock=clock)
    await limiter.hit("k", LIMIT)
    await limiter.hit("k", LIMIT)
    assert limiter.breaker.state is BreakerState.OPEN
    refused = await limiter.hit("k", LIMIT)
    assert refused.retry_after_s == pytest.approx(1.0), "refuse until the next trial"
    clock.advance(1.0)
    inner.gate = asyncio.Event()
    trial = asyncio.create_task(limiter.hit("k", LIMIT))
    await asyncio.sleep(0)
    others = [await limiter.hit("k", LIMIT) for _ in range(3)]
    assert inner.calls == 3, "only the trial reached the store"
    assert all(d.degraded for d in others)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    inner.gate, inner.down = None, False
    recovered = await limiter.hit("k", LIMIT)  # the next caller becomes the trial at once
    assert (recovered.allowed, recovered.degraded) == (True, False)
    assert limiter.healthy()


async def test_a_single_failure_does_not_open_the_breaker_and_success_resets_the_count() -> None:
    inner = Scripted()
    limiter = ResilientLimiter(inner, fail_open=True, failure_threshold=2, clock=ManualClock())
    assert (await limiter.hit("k", LIMIT)).degraded
    assert limiter.healthy()
    assert limiter.breaker.consecutive_failures == 1
    inner.down = False
    assert not (await limiter.hit("k", LIMIT)).degraded
    inner.down = True
    await limiter.hit("k", LIMIT)
    assert limiter.breaker.state is BreakerState.CLOSED, "failures must be consecutive"


async def test_caller_errors_are_not_store_failures() -> None:
    limiter = ResilientLimiter(Scripted(), fail_open=True, failure_threshold=1, clock=ManualClock())
    with pytest.raises(ValueError, match="cost"):
        await limiter.hit("k", LIMIT, cost=3)
    assert limiter.healthy()


class Bounded(Scripted):
    """Declares how long any of its calls can take at most, as the pipelined Redis connection does."""

    def __init__(self, call_bound_s: float) -> None:
        super().__init__()
        self.call_bound_s = call_bound_s


async def test_the_timer_is_skipped_only_when_the_inner_call_bounds_itself_within_the_budget() -> None:
    assert ResilientLimiter(Scripted(), fail_open=True, timeout_s=0.25).timer_needed
    assert ResilientLimiter(Bounded(0.5), fail_open=True, timeout_s=0.25).timer_needed
    assert not ResilientLimiter(Bounded(0.2), fail_open=True, timeout_s=0.25).timer_needed


async def test_an_unbounded_inner_call_that_hangs_is_cut_at_the_timeout() -> None:
    inner = Scripted()
    inner.gate = asyncio.Event()  # never set: the store hangs
    limiter = ResilientLimiter(inner, fail_open=True, timeout_s=0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    decision = await limiter.hit("k", LIMIT)
    assert (decision.allowed, decision.degraded) == (True, True)
    assert loop.time() - start < 0.5
