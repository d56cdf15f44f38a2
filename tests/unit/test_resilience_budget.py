"""Retry budget: under a dependency that always fails, retries stay within ratio × calls + the minimum."""

from __future__ import annotations

from random import Random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mercato.kit.clock import ManualClock
from mercato.kit.resilience import RetryBudget, RetryPolicy, retry_call


async def _no_sleep(seconds: float) -> None:
    return None


@settings(max_examples=60, deadline=None)
@given(
    calls=st.integers(min_value=1, max_value=400),
    ratio=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.5]),
    min_retries_per_s=st.sampled_from([0.0, 0.5, 1.0, 5.0]),
    max_attempts=st.integers(min_value=2, max_value=5),
    gap_s=st.sampled_from([0.0, 0.01, 0.1]),
)
async def test_total_attempts_are_bounded_under_a_dead_dependency(
    calls: int, ratio: float, min_retries_per_s: float, max_attempts: int, gap_s: float
) -> None:
    clock = ManualClock()
    budget = RetryBudget(ratio=ratio, min_retries_per_s=min_retries_per_s, clock=clock)
    attempts = 0

    async def always_fails() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("down")

    policy = RetryPolicy(max_attempts=max_attempts, timeout_s=None)
    for _ in range(calls):
        with pytest.raises(ConnectionError):
            await retry_call(always_fails, idempotent=True, policy=policy, budget=budget, sleep=_no_sleep)
        clock.advance(gap_s)
    elapsed_s = calls * gap_s
    minimum = min_retries_per_s + min_retries_per_s * elapsed_s  # initial reserve + refill
    assert attempts <= (1 + ratio) * calls + minimum + 1e-6
    assert budget.deposits == calls
    assert budget.withdrawals == attempts - calls


def test_ten_first_attempts_buy_one_retry_at_ten_percent() -> None:
    budget = RetryBudget(ratio=0.1, min_retries_per_s=0.0, initial_tokens=0.0, clock=ManualClock())
    for _ in range(9):
        budget.deposit()
    assert not budget.try_withdraw()
    budget.deposit()
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    assert budget.denials == 2


def test_balance_is_bounded_so_a_healthy_spell_cannot_bank_a_storm() -> None:
    clock = ManualClock()
    budget = RetryBudget(ratio=0.5, min_retries_per_s=1.0, max_tokens=5.0, clock=clock)
    for _ in range(1000):
        budget.deposit()
    clock.advance(3600)
    assert budget.tokens == 5.0
    granted = sum(budget.try_withdraw() for _ in range(100))
    assert granted == 5


def test_minimum_rate_refills_a_quiet_service() -> None:
    clock = ManualClock()
    budget = RetryBudget(ratio=0.0, min_retries_per_s=2.0, initial_tokens=0.0, clock=clock)
    assert not budget.try_withdraw()
    clock.advance(0.5)
    assert budget.try_withdraw()
    assert not budget.try_withdraw()


@given(seed=st.integers(min_value=0, max_value=10_000))
def test_withdrawals_never_exceed_what_was_earned(seed: int) -> None:
    rng = Random(seed)
    clock = ManualClock()
    budget = RetryBudget(ratio=0.1, min_retries_per_s=1.0, clock=clock)
    for _ in range(300):
        roll = rng.random()
        if roll < 0.5:
            budget.deposit()
        elif roll < 0.9:
            budget.try_withdraw()
        else:
            clock.advance(rng.random())
    earned = 1.0 + 0.1 * budget.deposits + 1.0 * clock.monotonic()
    assert budget.withdrawals <= earned + 1e-6
    assert 0.0 <= budget.tokens <= budget.max_tokens


def test_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        RetryBudget(ratio=-0.1)
