"""Hedged requests and the latency tracker; the hedge timer is an injected sleep the test fires."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mercato.kit.clock import ManualClock
from mercato.kit.resilience import LatencyTracker, RetryBudget, hedge_delay_s, hedged


class ManualTimer:
    """The hedge delay: records what was asked and returns only when the test fires it."""

    def __init__(self) -> None:
        self.fire = asyncio.Event()
        self.requested: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.requested.append(seconds)
        await self.fire.wait()


class Dependency:
    """Copy i waits for `gates[i]` then returns or raises `results[i]`; records cancellations."""

    def __init__(self, results: list[object]) -> None:
        self.results = results
        self.gates = [asyncio.Event() for _ in results]
        self.started = 0
        self.cancelled: list[int] = []

    async def __call__(self) -> object:
        index = self.started
        self.started += 1
        try:
            await self.gates[index].wait()
        except asyncio.CancelledError:
            self.cancelled.append(index)
            raise
        result = self.results[index]
        if isinstance(result, BaseException):
            raise result
        return result


class Hooks:
    def __init__(self) -> None:
        self.hedges = 0
        self.denied: list[str] = []

    def on_retry(self, name: str, *, attempt: int, wait_s: float, cause: BaseException | None) -> None:
        raise AssertionError("hedging never retries")

    def on_retry_denied(self, name: str, *, reason: str) -> None:
        self.denied.append(reason)

    def on_hedge(self, name: str) -> None:
        self.hedges += 1


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_backup_wins_and_the_slow_primary_is_cancelled() -> None:
    dep, timer, hooks = Dependency(["primary", "backup"]), ManualTimer(), Hooks()
    task = asyncio.create_task(hedged(dep, idempotent=True, delay_s=0.2, sleep=timer, hooks=[hooks]))
    await _settle()
    assert dep.started == 1
    assert timer.requested == [0.2]
    timer.fire.set()
    await _settle()
    assert dep.started == 2
    dep.gates[1].set()
    assert await task == "backup"
    assert dep.cancelled == [0]  # the loser was cancelled before hedged() returned
    assert hooks.hedges == 1


async def test_a_fast_primary_sends_no_backup() -> None:
    dep, timer = Dependency(["primary", "backup"]), ManualTimer()
    dep.gates[0].set()
    assert await hedged(dep, idempotent=True, delay_s=0.2, sleep=timer) == "primary"
    assert dep.started == 1


async def test_the_primary_can_still_win_after_the_backup_started() -> None:
    dep, timer = Dependency(["primary", "backup"]), ManualTimer()
    task = asyncio.create_task(hedged(dep, idempotent=True, delay_s=0.2, sleep=timer))
    await _settle()
    timer.fire.set()
    await _settle()
    dep.gates[0].set()
    assert await task == "primary"
    assert dep.cancelled == [1]


async def test_a_failed_copy_does_not_end_the_race_while_another_is_in_flight() -> None:
    dep, timer = Dependency([ConnectionError("primary down"), "backup"]), ManualTimer()
    task = asyncio.create_task(hedged(dep, idempotent=True, delay_s=0.2, sleep=timer))
    await _settle()
    timer.fire.set()
    await _settle()
    dep.gates[0].set()
    await _settle()
    assert not task.done()
    dep.gates[1].set()
    assert await task == "backup"


async def test_when_every_copy_fails_the_first_error_is_raised() -> None:
    dep, timer = Dependency([ConnectionError("first"), TimeoutError("second")]), ManualTimer()
    task = asyncio.create_task(hedged(dep, idempotent=True, delay_s=0.2, sleep=timer))
    await _settle()
    timer.fire.set()
    await _settle()
    dep.gates[1].set()
    await _settle()
    dep.gates[0].set()
    with pytest.raises(TimeoutError, match="second"):
        await task


async def test_a_primary_failing_before_the_delay_fails_without_a_hedge() -> None:
    dep, timer = Dependency([ConnectionError("down"), "backup"]), ManualTimer()
    dep.gates[0].set()
    with pytest.raises(ConnectionError):
        await hedged(dep, idempotent=True, delay_s=0.2, sleep=timer)
    assert dep.started == 1


async def test_non_idempotent_calls_are_never_hedged() -> None:
    dep, timer = Dependency(["primary", "backup"]), ManualTimer()
    timer.fire.set()
    task = asyncio.create_task(hedged(dep, idempotent=False, delay_s=0.0, sleep=timer))
    await _settle()
    dep.gates[0].set()
    assert await task == "primary"
    assert dep.started == 1
    assert timer.requested == []


async def test_a_hedge_is_a_budgeted_attempt() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_s=0.0, initial_tokens=0.0, clock=ManualClock())
    dep, timer, hooks = Dependency(["primary", "backup"]), ManualTimer(), Hooks()
    task = asyncio.create_task(
        hedged(dep, idempotent=True, delay_s=0.2, sleep=timer, budget=budget, hooks=[hooks])
    )
    await _settle()
    timer.fire.set()
    await _settle()
    assert dep.started == 1  # no token, no backup
    assert hooks.denied == ["budget"]
    dep.gates[0].set()
    assert await task == "primary"


async def test_max_hedges_bounds_the_copies() -> None:
    dep, timer = Dependency(["a", "b", "c", "d"]), ManualTimer()
    timer.fire.set()
    task = asyncio.create_task(hedged(dep, idempotent=True, delay_s=0.1, max_hedges=2, sleep=timer))
    await _settle()
    assert dep.started == 3
    dep.gates[2].set()
    assert await task == "c"
    assert sorted(dep.cancelled) == [0, 1]


async def test_the_delay_is_the_observed_p95_once_the_tracker_is_warm() -> None:
    tracker = LatencyTracker(capacity=100, min_samples=20)
    assert hedge_delay_s(tracker=tracker, fallback_delay_s=0.3) == 0.3
    for ms in range(1, 101):
        tracker.record(ms / 1000)
    dep, timer = Dependency(["primary"]), ManualTimer()
    dep.gates[0].set()
    await hedged(dep, idempotent=True, tracker=tracker, delay_s=0.3, sleep=timer)
    assert timer.requested == [0.095]


async def test_without_any_delay_there_is_no_hedging() -> None:
    dep = Dependency(["primary"])
    dep.gates[0].set()
    assert await hedged(dep, idempotent=True, tracker=LatencyTracker()) == "primary"


async def test_smoke_with_a_real_tiny_delay() -> None:
    calls = 0

    async def first_slow() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(5)
        return f"copy {calls}"

    started = time.perf_counter()
    assert await hedged(first_slow, idempotent=True, delay_s=0.01) == "copy 2"
    assert time.perf_counter() - started < 1.0


@given(samples=st.lists(st.floats(min_value=0, max_value=10), min_size=1, max_size=300))
def test_quantile_is_a_recent_sample_with_q_of_them_at_or_below(samples: list[float]) -> None:
    tracker = LatencyTracker(capacity=64, min_samples=1)
    for sample in samples:
        tracker.record(sample)
    recent = samples[-64:]
    p95 = tracker.p95_s()
    assert p95 in recent
    assert sum(s <= p95 for s in recent) >= 0.95 * len(recent)
    assert sum(s < p95 for s in recent) < 0.95 * len(recent)
    assert len(tracker) == len(recent)


def test_tracker_is_silent_until_warm_and_forgets_old_regimes() -> None:
    tracker = LatencyTracker(capacity=10, min_samples=5)
    for _ in range(4):
        tracker.record(1.0)
    assert tracker.p95_s() is None
    tracker.record(1.0)
    assert tracker.p95_s() == 1.0
    for _ in range(10):
        tracker.record(0.01)
    assert tracker.p95_s() == 0.01
    with pytest.raises(ValueError):
        tracker.quantile(0.0)
