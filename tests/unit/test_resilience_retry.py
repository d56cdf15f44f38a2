"""Backoff and retry: jitter bounds, idempotency gate, deadline, budget, test switch, without sleeping."""

from __future__ import annotations

import asyncio
from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mercato.kit.clock import ManualClock
from mercato.kit.resilience import (
    CircuitOpen,
    DeadlineExceeded,
    RetryBudget,
    RetryPolicy,
    deadline_scope,
    full_jitter_backoff_s,
    retry_call,
    set_testing,
)


class FakeSleep:
    """Records pauses and moves the manual clock instead of sleeping."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.pauses: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.clock.advance(seconds)


class Flaky:
    """Fails `failures` times with `error`, then returns "ok"; counts attempts."""

    def __init__(self, failures: int, error: type[BaseException] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.attempts = 0

    async def __call__(self) -> str:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise self.error("boom")
        return "ok"


class RecordingHooks:
    def __init__(self) -> None:
        self.retries: list[tuple[int, float]] = []
        self.denied: list[str] = []
        self.hedges = 0

    def on_retry(self, name: str, *, attempt: int, wait_s: float, cause: BaseException | None) -> None:
        self.retries.append((attempt, wait_s))

    def on_retry_denied(self, name: str, *, reason: str) -> None:
        self.denied.append(reason)

    def on_hedge(self, name: str) -> None:
        self.hedges += 1


@given(
    attempt=st.integers(min_value=0, max_value=2000),
    base_s=st.floats(min_value=0.0, max_value=10.0),
    cap_s=st.floats(min_value=0.0, max_value=60.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_full_jitter_stays_within_zero_and_the_capped_exponential(
    attempt: int, base_s: float, cap_s: float, seed: int
) -> None:
    pause = full_jitter_backoff_s(attempt, base_s=base_s, cap_s=cap_s, rng=Random(seed))
    assert 0.0 <= pause <= min(cap_s, base_s * 2.0 ** min(attempt, 64))


def test_full_jitter_spreads_over_the_whole_interval() -> None:
    rng = Random(7)
    pauses = [full_jitter_backoff_s(3, base_s=0.1, cap_s=10.0, rng=rng) for _ in range(2000)]
    assert max(pauses) <= 0.8
    # Full jitter: uniform over [0, 0.8], so both ends of the interval are used.
    assert min(pauses) < 0.05
    assert max(pauses) > 0.75
    assert sum(pauses) / len(pauses) == pytest.approx(0.4, abs=0.03)


async def test_retries_an_idempotent_operation_until_it_succeeds() -> None:
    clock = ManualClock()
    sleep = FakeSleep(clock)
    hooks = RecordingHooks()
    flaky = Flaky(2)
    policy = RetryPolicy(max_attempts=3, base_s=0.1, cap_s=1.0)
    result = await retry_call(
        flaky, idempotent=True, policy=policy, clock=clock, rng=Random(1), sleep=sleep, hooks=[hooks]
    )
    assert result == "ok"
    assert flaky.attempts == 3
    assert [attempt for attempt, _ in hooks.retries] == [2, 3]
    assert 0 <= sleep.pauses[0] <= 0.1
    assert 0 <= sleep.pauses[1] <= 0.2


async def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    flaky = Flaky(10)
    with pytest.raises(ConnectionError):
        await retry_call(
            flaky, idempotent=True, policy=RetryPolicy(max_attempts=3), sleep=FakeSleep(ManualClock())
        )
    assert flaky.attempts == 3


@given(failures=st.integers(min_value=1, max_value=5), max_attempts=st.integers(min_value=1, max_value=6))
async def test_never_retries_a_non_idempotent_operation(failures: int, max_attempts: int) -> None:
    flaky = Flaky(failures)
    hooks = RecordingHooks()
    sleep = FakeSleep(ManualClock())
    with pytest.raises(ConnectionError):
        await retry_call(
            flaky, idempotent=False, policy=RetryPolicy(max_attempts=max_attempts), sleep=sleep, hooks=[hooks]
        )
    assert flaky.attempts == 1
    assert sleep.pauses == []
    assert hooks.denied == ["not_idempotent"]


async def test_non_retryable_errors_and_resilience_errors_are_not_retried() -> None:
    sleep = FakeSleep(ManualClock())
    value_error = Flaky(1, ValueError)
    with pytest.raises(ValueError):
        await retry_call(value_error, idempotent=True, sleep=sleep)
    assert value_error.attempts == 1

    open_calls = 0

    async def refused() -> str:
        nonlocal open_calls
        open_calls += 1
        raise CircuitOpen("open", retry_after_s=1.0)

    policy = RetryPolicy(retry_on=(Exception,))
    with pytest.raises(CircuitOpen):
        await retry_call(refused, idempotent=True, policy=policy, sleep=sleep)
    assert open_calls == 1


@given(
    deadline_s=st.floats(min_value=0.01, max_value=3.0),
    seed=st.integers(min_value=0, max_value=1000),
)
async def test_never_sleeps_past_the_deadline(deadline_s: float, seed: int) -> None:
    clock = ManualClock()
    sleep = FakeSleep(clock)
    flaky = Flaky(100)
    policy = RetryPolicy(max_attempts=50, base_s=0.2, cap_s=2.0, timeout_s=None)
    with deadline_scope(timeout_s=deadline_s, clock=clock) as deadline:
        assert deadline is not None
        with pytest.raises(ConnectionError):
            await retry_call(
                flaky, idempotent=True, policy=policy, clock=clock, rng=Random(seed), sleep=sleep
            )
        # Every pause ended strictly before the deadline, so no attempt started after it.
        assert not deadline.expired
    assert sum(sleep.pauses) < deadline_s


async def test_an_expired_deadline_refuses_to_start() -> None:
    clock = ManualClock()
    flaky = Flaky(0)
    with deadline_scope(timeout_s=1.0, clock=clock):
        clock.advance(1.0)
        with pytest.raises(DeadlineExceeded):
            await retry_call(flaky, idempotent=True, clock=clock)
    assert flaky.attempts == 0


async def test_per_attempt_timeout_is_retried_and_deadline_timeout_is_deadline_exceeded() -> None:
    attempts = 0

    async def hangs_once() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await asyncio.sleep(10)
        return "ok"

    policy = RetryPolicy(max_attempts=2, timeout_s=0.01, base_s=0.0)
    assert await retry_call(hangs_once, idempotent=True, policy=policy) == "ok"
    assert attempts == 2

    async def hangs() -> str:
        await asyncio.sleep(10)
        return "never"

    with deadline_scope(timeout_s=0.01), pytest.raises(DeadlineExceeded):
        await retry_call(hangs, idempotent=True, policy=RetryPolicy(timeout_s=5.0))


async def test_each_attempt_runs_under_its_own_tighter_deadline() -> None:
    clock = ManualClock()
    seen: list[float] = []

    async def observe() -> str:
        from mercato.kit.resilience import current_deadline

        deadline = current_deadline()
        assert deadline is not None
        seen.append(deadline.remaining_s())
        return "ok"

    with deadline_scope(timeout_s=5.0, clock=clock):
        await retry_call(observe, idempotent=True, policy=RetryPolicy(timeout_s=0.3), clock=clock)
    assert seen == [pytest.approx(0.3)]


async def test_the_budget_is_asked_before_each_retry() -> None:
    clock = ManualClock()
    budget = RetryBudget(ratio=0.0, min_retries_per_s=0.0, initial_tokens=1.0, clock=clock)
    hooks = RecordingHooks()
    first, second = Flaky(5), Flaky(5)
    policy = RetryPolicy(max_attempts=5)
    for flaky in (first, second):
        with pytest.raises(ConnectionError):
            await retry_call(
                flaky, idempotent=True, policy=policy, budget=budget, sleep=FakeSleep(clock), hooks=[hooks]
            )
    assert first.attempts == 2  # the single token
    assert second.attempts == 1
    assert hooks.denied == ["budget", "budget"]


async def test_retryable_results_are_retried_and_the_last_one_returned() -> None:
    answers = iter([503, 503, 503])

    async def status() -> int:
        return next(answers)

    policy = RetryPolicy(max_attempts=3, retry_on_result=lambda code: code >= 500)
    assert await retry_call(status, idempotent=True, policy=policy, sleep=FakeSleep(ManualClock())) == 503


async def test_testing_switch_removes_pauses_and_caps_attempts() -> None:
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    set_testing(True, max_attempts=2)
    try:
        flaky = Flaky(5)
        with pytest.raises(ConnectionError):
            await retry_call(
                flaky, idempotent=True, policy=RetryPolicy(max_attempts=5, base_s=10.0), sleep=sleep
            )
    finally:
        set_testing(False)
    assert flaky.attempts == 2
    assert pauses == []


def test_policy_validates_its_parameters() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(timeout_s=0.0)
