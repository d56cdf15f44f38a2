"""The composed policy at unit level (fakes, a manual clock)."""

from __future__ import annotations

import asyncio
from random import Random

import pytest

from mercato.kit.clock import ManualClock
from mercato.kit.resilience import (
    BreakerConfig,
    BreakerRegistry,
    BreakerState,
    Bulkhead,
    BulkheadFull,
    CircuitBreaker,
    CircuitOpen,
    DeadlineExceeded,
    HedgeConfig,
    LatencyTracker,
    ResiliencePolicy,
    RetryBudget,
    RetryPolicy,
    deadline_scope,
)


async def _no_sleep(seconds: float) -> None:
    return None


def _policy(clock: ManualClock, **overrides: object) -> ResiliencePolicy:
    breaker = CircuitBreaker(
        "dep",
        config=BreakerConfig(minimum_calls=3, wait_s=5.0, half_open_probes=1, slow_call_duration_s=1.0),
        clock=clock,
    )
    options: dict[str, object] = {
        "retry": RetryPolicy(max_attempts=3, timeout_s=None),
        "breaker": breaker,
        "clock": clock,
        "rng": Random(0),
        "sleep": _no_sleep,
    }
    options.update(overrides)
    return ResiliencePolicy("dep", **options)  # type: ignore[arg-type]


async def test_each_attempt_is_a_breaker_sample_and_an_open_breaker_stops_retries() -> None:
    clock = ManualClock()
    policy = _policy(clock)
    attempts = 0

    async def down() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await policy.call(down, idempotent=True)
    assert attempts == 3
    assert policy.breaker is not None
    assert policy.breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        await policy.call(down, idempotent=True)
    assert attempts == 3  # refused without touching the dependency, and not retried


async def test_non_idempotent_calls_get_one_attempt() -> None:
    policy = _policy(ManualClock())
    attempts = 0

    async def down() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await policy.call(down, idempotent=False)
    assert attempts == 1


async def test_slow_successes_feed_the_breaker_and_fast_ones_the_latency_tracker() -> None:
    clock = ManualClock()
    tracker = LatencyTracker(min_samples=1)
    policy = _policy(clock, latency=tracker)

    async def slow() -> str:
        clock.advance(2.0)
        return "late"

    for _ in range(3):
        assert await policy.call(slow, idempotent=True) == "late"
    assert policy.breaker is not None
    assert policy.breaker.state is BreakerState.OPEN
    assert tracker.p95_s() == 2.0


async def test_result_classification_counts_for_the_breaker_and_for_retries() -> None:
    clock = ManualClock()
    policy = _policy(clock)
    answers = iter([503, 503, 200])

    async def status() -> int:
        return next(answers)

    result = await policy.call(status, idempotent=True, result_is_failure=lambda code: code >= 500)
    assert result == 200
    assert policy.breaker is not None
    assert policy.breaker.snapshot()["failures"] == 2


async def test_a_timeout_caused_by_the_deadline_is_not_held_against_the_dependency() -> None:
    policy = _policy(ManualClock(), retry=RetryPolicy(max_attempts=3, timeout_s=5.0))

    async def hangs() -> None:
        await asyncio.sleep(10)

    with deadline_scope(timeout_s=0.01), pytest.raises(DeadlineExceeded):
        await policy.call(hangs, idempotent=True)
    assert policy.breaker is not None
    assert policy.breaker.snapshot()["calls"] == 0


async def test_a_per_attempt_timeout_is_a_breaker_failure_and_is_retried() -> None:
    policy = _policy(ManualClock(), retry=RetryPolicy(max_attempts=2, timeout_s=0.01))
    attempts = 0

    async def hangs_once() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await asyncio.sleep(10)
        return "ok"

    assert await policy.call(hangs_once, idempotent=True) == "ok"
    assert policy.breaker is not None
    assert policy.breaker.snapshot()["failures"] == 1


async def test_a_per_attempt_timeout_inside_a_total_deadline_is_still_retried() -> None:
    """The attempt's own timeout (tighter than the deadline) is not the deadline passing."""
    policy = _policy(ManualClock(), retry=RetryPolicy(max_attempts=2, timeout_s=0.01), total_timeout_s=5.0)
    attempts = 0

    async def hangs_once() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await asyncio.sleep(10)
        return "ok"

    assert await policy.call(hangs_once, idempotent=True) == "ok"
    assert attempts == 2
    assert policy.breaker is not None
    assert policy.breaker.snapshot()["failures"] == 1


async def test_total_timeout_sets_a_deadline_for_the_call() -> None:
    clock = ManualClock()
    policy = _policy(clock, total_timeout_s=1.0)
    attempts = 0

    async def down_and_slow() -> None:
        nonlocal attempts
        attempts += 1
        clock.advance(0.6)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):  # the last real error, not a synthetic one
        await policy.call(down_and_slow, idempotent=True)
    assert attempts == 2  # a third would start after the deadline, so it is not tried


async def test_bulkhead_full_releases_the_half_open_probe() -> None:
    clock = ManualClock()
    bulkhead = Bulkhead("dep", max_concurrent=1)
    policy = _policy(clock, bulkhead=bulkhead)
    assert policy.breaker is not None
    for _ in range(3):
        policy.breaker.acquire().failure(duration_s=0.0)
    clock.advance(5.0)
    assert policy.breaker.state is BreakerState.HALF_OPEN
    await bulkhead.acquire()

    async def ok() -> str:
        return "ok"

    with pytest.raises(BulkheadFull):
        await policy.call(ok, idempotent=True)
    bulkhead.release()
    assert await policy.call(ok, idempotent=True) == "ok"  # the probe slot came back
    assert policy.breaker.state is BreakerState.CLOSED


async def test_hedged_read_through_the_policy_is_budgeted_and_cancels_the_loser() -> None:
    clock = ManualClock()
    budget = RetryBudget(ratio=0.1, min_retries_per_s=0.0, initial_tokens=1.0, clock=clock)
    policy = _policy(clock, budget=budget, hedge=HedgeConfig(fallback_delay_s=0.005), sleep=asyncio.sleep)
    copies = 0
    cancelled = asyncio.Event()

    async def first_slow() -> str:
        nonlocal copies
        copies += 1
        if copies == 1:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return f"copy {copies}"

    assert await policy.call(first_slow, idempotent=True, hedge=True) == "copy 2"
    assert cancelled.is_set()
    assert budget.withdrawals == 1
    assert policy.breaker is not None
    snap = policy.breaker.snapshot()
    assert snap["calls"] == 1
    assert snap["failures"] == 0


def test_for_dependency_derives_the_guide_defaults_from_p95() -> None:
    clock = ManualClock()
    breakers = BreakerRegistry(clock=clock)
    policy = ResiliencePolicy.for_dependency("payments", p95_s=0.2, breakers=breakers, clock=clock)
    assert policy.retry.timeout_s == pytest.approx(0.25)  # p95 + max(50 ms, 25 %)
    assert policy.retry.max_attempts == 3
    assert policy.breaker is breakers.get("payments")
    assert policy.breaker.config.slow_call_duration_s == 0.2
    assert policy.bulkhead is not None
    assert policy.bulkhead.max_concurrent == 64
    assert policy.budget is not None
    assert policy.budget.ratio == 0.1
    assert policy.hedge == HedgeConfig(fallback_delay_s=0.2)
    fast = ResiliencePolicy.for_dependency("cache", p95_s=0.01, clock=clock)
    assert fast.retry.timeout_s == pytest.approx(0.06)
