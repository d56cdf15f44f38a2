"""Circuit breaker state machine driven by a ManualClock: no sleeping anywhere."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from prometheus_client import CollectorRegistry

from mercato.kit.clock import ManualClock
from mercato.kit.resilience import (
    BreakerConfig,
    BreakerRegistry,
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    Outcome,
    Permit,
    PrometheusResilienceHooks,
)

CONFIG = BreakerConfig(
    failure_rate_threshold=0.5,
    slow_call_rate_threshold=0.6,
    slow_call_duration_s=1.0,
    minimum_calls=10,
    window_s=10.0,
    window_buckets=10,
    wait_s=5.0,
    half_open_probes=3,
)


class Transitions:
    def __init__(self) -> None:
        self.changes: list[tuple[BreakerState | None, BreakerState]] = []
        self.calls: list[tuple[Outcome, float]] = []
        self.rejected = 0

    def on_state_change(self, name: str, old: BreakerState | None, new: BreakerState) -> None:
        self.changes.append((old, new))

    def on_call(self, name: str, outcome: Outcome, duration_s: float) -> None:
        self.calls.append((outcome, duration_s))

    def on_rejected(self, name: str) -> None:
        self.rejected += 1


def make(clock: ManualClock, config: BreakerConfig = CONFIG) -> tuple[CircuitBreaker, Transitions]:
    hooks = Transitions()
    return CircuitBreaker("payments", config=config, clock=clock, hooks=[hooks]), hooks


def feed(breaker: CircuitBreaker, count: int, outcome: Outcome, *, duration_s: float = 0.01) -> None:
    for _ in range(count):
        breaker.acquire().record(outcome, duration_s=duration_s)


def trip(breaker: CircuitBreaker) -> None:
    feed(breaker, CONFIG.minimum_calls, Outcome.FAILURE)
    assert breaker.state is BreakerState.OPEN


def test_opens_on_error_rate_once_the_threshold_is_reached() -> None:
    breaker, hooks = make(ManualClock())
    feed(breaker, 5, Outcome.SUCCESS)
    feed(breaker, 4, Outcome.FAILURE)
    assert breaker.state is BreakerState.CLOSED  # 9 calls: below minimum_calls
    feed(breaker, 1, Outcome.FAILURE)  # 10 calls, 50 % failures
    assert breaker.state is BreakerState.OPEN
    assert hooks.changes == [(None, BreakerState.CLOSED), (BreakerState.CLOSED, BreakerState.OPEN)]


def test_stays_closed_below_the_error_rate() -> None:
    breaker, _ = make(ManualClock())
    for _ in range(10):
        feed(breaker, 3, Outcome.SUCCESS)
        feed(breaker, 2, Outcome.FAILURE)  # 40 %
    assert breaker.state is BreakerState.CLOSED


def test_does_not_open_before_minimum_calls_even_at_100_percent_failures() -> None:
    breaker, _ = make(ManualClock())
    feed(breaker, CONFIG.minimum_calls - 1, Outcome.FAILURE)
    assert breaker.state is BreakerState.CLOSED
    feed(breaker, 1, Outcome.FAILURE)
    assert breaker.state is BreakerState.OPEN


def test_opens_on_slow_call_rate_even_when_every_call_succeeds() -> None:
    breaker, _ = make(ManualClock())
    feed(breaker, 4, Outcome.SUCCESS, duration_s=0.1)
    feed(breaker, 5, Outcome.SUCCESS, duration_s=1.0)  # slow = duration >= slow_call_duration_s
    assert breaker.state is BreakerState.CLOSED
    feed(breaker, 1, Outcome.SUCCESS, duration_s=2.5)  # 6 of 10 slow = 60 %
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot()["slow_call_rate"] == 0.6


def test_duration_defaults_to_the_clock_time_since_admission() -> None:
    clock = ManualClock()
    breaker, hooks = make(clock)
    permit = breaker.acquire()
    clock.advance(1.25)
    permit.success()
    assert hooks.calls == [(Outcome.SUCCESS, 1.25)]
    assert breaker.snapshot()["slow_calls"] == 1


def test_old_failures_slide_out_of_the_window() -> None:
    clock = ManualClock()
    breaker, _ = make(clock)
    feed(breaker, 9, Outcome.FAILURE)
    clock.advance(CONFIG.window_s + 1.0)
    feed(breaker, 9, Outcome.SUCCESS)
    feed(breaker, 1, Outcome.FAILURE)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["calls"] == 10


def test_open_rejects_fast_with_retry_after_and_counts_rejections() -> None:
    clock = ManualClock()
    breaker, hooks = make(clock)
    trip(breaker)
    clock.advance(2.0)
    with pytest.raises(CircuitOpen) as caught:
        breaker.acquire()
    assert caught.value.retry_after_s == pytest.approx(3.0)
    assert caught.value.dependency == "payments"
    with pytest.raises(CircuitOpen):
        breaker.acquire()
    assert breaker.rejections == hooks.rejected == 2


def test_half_open_admits_exactly_n_probes_and_closes_when_they_succeed() -> None:
    clock = ManualClock()
    breaker, hooks = make(clock)
    trip(breaker)
    clock.advance(CONFIG.wait_s)
    assert breaker.state is BreakerState.HALF_OPEN
    probes = [breaker.acquire() for _ in range(CONFIG.half_open_probes)]
    assert breaker.probes_in_flight == 3
    with pytest.raises(CircuitOpen) as caught:
        breaker.acquire()
    assert caught.value.retry_after_s == 0.0
    for probe in probes:
        probe.success(duration_s=0.01)
    assert breaker.state is BreakerState.CLOSED
    assert hooks.changes[-3:] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
    assert breaker.snapshot()["calls"] == 0  # a fresh window after recovery
    breaker.acquire().success()


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ([Outcome.SUCCESS, Outcome.SUCCESS, Outcome.FAILURE], BreakerState.CLOSED),  # 33 % < 50 %
        ([Outcome.FAILURE, Outcome.SUCCESS, Outcome.FAILURE], BreakerState.OPEN),
        ([Outcome.FAILURE, Outcome.FAILURE, Outcome.FAILURE], BreakerState.OPEN),
    ],
)
def test_half_open_decides_on_the_probes_rate(outcomes: list[Outcome], expected: BreakerState) -> None:
    clock = ManualClock()
    breaker, _ = make(clock)
    trip(breaker)
    clock.advance(CONFIG.wait_s)
    probes = [breaker.acquire() for _ in outcomes]
    for probe, outcome in zip(probes[:-1], outcomes[:-1], strict=True):
        probe.record(outcome, duration_s=0.01)
        assert breaker.state is BreakerState.HALF_OPEN  # undecided until all probes are back
    probes[-1].record(outcomes[-1], duration_s=0.01)
    assert breaker.state is expected
    if expected is BreakerState.OPEN:
        with pytest.raises(CircuitOpen) as caught:
            breaker.acquire()
        assert caught.value.retry_after_s == CONFIG.wait_s  # the wait starts again


def test_slow_probes_reopen_the_circuit() -> None:
    clock = ManualClock()
    breaker, _ = make(clock)
    trip(breaker)
    clock.advance(CONFIG.wait_s)
    for probe in [breaker.acquire() for _ in range(3)]:
        probe.success(duration_s=3.0)
    assert breaker.state is BreakerState.OPEN


def test_an_ignored_probe_gives_its_slot_back() -> None:
    clock = ManualClock()
    breaker, _ = make(clock)
    trip(breaker)
    clock.advance(CONFIG.wait_s)
    probes = [breaker.acquire() for _ in range(3)]
    probes[0].ignore()
    replacement = breaker.acquire()
    with pytest.raises(CircuitOpen):
        breaker.acquire()
    for probe in [*probes[1:], replacement]:
        probe.success(duration_s=0.0)
    assert breaker.state is BreakerState.CLOSED


def test_outcomes_from_before_a_transition_do_not_move_the_new_state() -> None:
    clock = ManualClock()
    breaker, hooks = make(clock)
    straggler = breaker.acquire()  # admitted while CLOSED
    trip(breaker)
    clock.advance(CONFIG.wait_s)
    probes = [breaker.acquire() for _ in range(3)]
    straggler.failure(duration_s=9.0)  # reported to hooks, but it is no probe
    assert hooks.calls[-1] == (Outcome.FAILURE, 9.0)
    for probe in probes:
        probe.success(duration_s=0.0)
    assert breaker.state is BreakerState.CLOSED


def test_a_permit_counts_once() -> None:
    breaker, hooks = make(ManualClock())
    permit = breaker.acquire()
    permit.failure(duration_s=0.0)
    permit.failure(duration_s=0.0)
    assert len(hooks.calls) == 1


async def test_call_and_guard_classify_outcomes() -> None:
    clock = ManualClock()
    breaker, hooks = make(clock)

    async def ok() -> str:
        return "ok"

    async def bad() -> str:
        raise LookupError("nope")

    assert await breaker.call(ok) == "ok"
    with pytest.raises(LookupError):
        await breaker.call(bad)
    with pytest.raises(LookupError):
        await breaker.call(bad, is_failure=lambda exc: not isinstance(exc, LookupError))

    async def cancelled() -> None:
        async with breaker.guard():
            await asyncio.Event().wait()

    task = asyncio.create_task(cancelled())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [outcome for outcome, _ in hooks.calls] == [
        Outcome.SUCCESS,
        Outcome.FAILURE,
        Outcome.SUCCESS,
        Outcome.IGNORED,
    ]


async def test_call_refuses_without_running_the_function_when_open() -> None:
    breaker, _ = make(ManualClock())
    trip(breaker)
    ran = False

    async def fn() -> None:
        nonlocal ran
        ran = True

    with pytest.raises(CircuitOpen):
        await breaker.call(fn)
    assert not ran


def test_rejection_is_cheap() -> None:
    breaker = CircuitBreaker("fast", config=CONFIG, clock=ManualClock())
    trip(breaker)
    rounds = 20_000
    started = time.perf_counter()
    for _ in range(rounds):
        try:
            breaker.acquire()
        except CircuitOpen:
            continue
    per_call_s = (time.perf_counter() - started) / rounds
    # Typically ~1 µs; the bound leaves room for a busy CI machine while still ruling out any I/O.
    assert per_call_s < 50e-6


def test_prometheus_hooks_export_state_transitions_calls_and_rejections() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusResilienceHooks(registry)
    clock = ManualClock()
    breaker = CircuitBreaker("payments", config=CONFIG, clock=clock, hooks=[metrics])

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"dependency": "payments", **labels})

    assert value("mercato_breaker_state") == 0
    feed(breaker, 10, Outcome.FAILURE)
    with pytest.raises(CircuitOpen):
        breaker.acquire()
    assert value("mercato_breaker_state") == 2
    assert value("mercato_breaker_calls_total", outcome="failure") == 10
    assert value("mercato_breaker_rejections_total") == 1
    assert value("mercato_breaker_transitions_total", from_state="closed", to_state="open") == 1
    clock.advance(CONFIG.wait_s)
    assert breaker.state is BreakerState.HALF_OPEN
    assert value("mercato_breaker_state") == 1


def test_registry_keeps_one_breaker_per_dependency_and_snapshots_as_json() -> None:
    clock = ManualClock()
    registry = BreakerRegistry(defaults=CONFIG, clock=clock)
    payments = registry.get("payments")
    assert registry.get("payments") is payments
    carrier = registry.get("carrier", config=BreakerConfig(minimum_calls=1))
    assert "carrier" in registry
    assert len(registry) == 2
    assert carrier.config.minimum_calls == 1
    trip(payments)
    clock.advance(1.0)
    snapshot = json.loads(json.dumps(registry.snapshot()))
    assert list(snapshot) == ["carrier", "payments"]
    assert snapshot["payments"]["state"] == "open"
    assert snapshot["payments"]["failure_rate"] == 1.0
    assert snapshot["payments"]["retry_after_s"] == 4.0
    assert snapshot["payments"]["opened_at"] == "2026-01-01T00:00:00Z"
    assert snapshot["carrier"]["state"] == "closed"
    assert snapshot["carrier"]["opened_at"] is None
    assert {b.name for b in registry} == {"payments", "carrier"}


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        BreakerConfig(failure_rate_threshold=0.0)
    with pytest.raises(ValueError):
        BreakerConfig(half_open_probes=0)


class BreakerMachine(RuleBasedStateMachine):
    """Random interleavings of admissions, outcomes and time; the invariants hold after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.hooks = Transitions()
        self.config = BreakerConfig(
            minimum_calls=4,
            window_s=4.0,
            window_buckets=4,
            wait_s=2.0,
            half_open_probes=2,
            slow_call_duration_s=1.0,
        )
        self.breaker = CircuitBreaker("dep", config=self.config, clock=self.clock, hooks=[self.hooks])
        self.permits: list[Permit] = []

    @rule()
    def acquire(self) -> None:
        state = self.breaker.state
        probes_taken = self.breaker._probes_admitted
        try:
            self.permits.append(self.breaker.acquire())
        except CircuitOpen:
            # Rejects only when OPEN, or HALF_OPEN with every probe slot taken.
            assert state is BreakerState.OPEN or (
                state is BreakerState.HALF_OPEN and probes_taken == self.config.half_open_probes
            )
        else:
            assert state is not BreakerState.OPEN

    @precondition(lambda self: bool(self.permits))
    @rule(
        index=st.integers(min_value=0, max_value=50),
        outcome=st.sampled_from(list(Outcome)),
        duration_s=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    )
    def finish(self, index: int, outcome: Outcome, duration_s: float) -> None:
        permit = self.permits.pop(index % len(self.permits))
        permit.record(outcome, duration_s=duration_s)

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 2.0, 5.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def transitions_follow_the_diagram(self) -> None:
        allowed = {
            (None, BreakerState.CLOSED),
            (BreakerState.CLOSED, BreakerState.OPEN),
            (BreakerState.OPEN, BreakerState.HALF_OPEN),
            (BreakerState.HALF_OPEN, BreakerState.OPEN),
            (BreakerState.HALF_OPEN, BreakerState.CLOSED),
        }
        assert set(self.hooks.changes) <= allowed  # never OPEN -> CLOSED directly
        for (_, new), (old, _) in zip(self.hooks.changes, self.hooks.changes[1:], strict=False):
            assert new == old

    @invariant()
    def probes_are_bounded(self) -> None:
        assert 0 <= self.breaker.probes_in_flight <= self.config.half_open_probes

    @invariant()
    def rejections_are_all_counted(self) -> None:
        assert self.breaker.rejections == self.hooks.rejected

    @invariant()
    def snapshot_is_consistent(self) -> None:
        snap = self.breaker.snapshot()
        assert snap["state"] == self.breaker.state.value
        assert 0 <= snap["failures"] <= snap["calls"]
        assert 0 <= snap["slow_calls"] <= snap["calls"]
        assert (snap["retry_after_s"] is not None) == (snap["state"] == "open")
        if snap["retry_after_s"] is not None:
            assert 0 <= snap["retry_after_s"] <= self.config.wait_s


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
