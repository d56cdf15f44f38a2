"""Circuit breaker state machine driven by a ManualClock: no sleeping anywhere."""

from __future__ import annotations

import asyncio
import json
import time
from random import Random

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
    wait_multiplier=2.0,
    max_wait_s=40.0,
    wait_jitter=0.0,  # exact waits; the jitter has tests of its own
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
    clock.advance(0.25)
    with pytest.raises(CircuitOpen) as caught:
        breaker.acquire()
    # By then the oldest probe is back or judged slow: the earliest the state can have moved for sure.
    assert caught.value.retry_after_s == pytest.approx(CONFIG.slow_call_duration_s - 0.25)
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
    ("outcomes", "expected", "decided_after"),
    [
        # 1 failure in 3 planned probes stays below 50 %: closes only once all three are back.
        ([Outcome.SUCCESS, Outcome.SUCCESS, Outcome.FAILURE], BreakerState.CLOSED, 3),
        ([Outcome.FAILURE, Outcome.SUCCESS, Outcome.FAILURE], BreakerState.OPEN, 3),
        # 2 of 3 planned already reach 50 % whatever the third says: reopens at once.
        ([Outcome.FAILURE, Outcome.FAILURE, Outcome.SUCCESS], BreakerState.OPEN, 2),
    ],
)
def test_half_open_decides_on_the_probes_rate_and_reopens_as_soon_as_it_is_certain(
    outcomes: list[Outcome], expected: BreakerState, decided_after: int
) -> None:
    clock = ManualClock()
    breaker, _ = make(clock)
    trip(breaker)
    clock.advance(CONFIG.wait_s)
    probes = [breaker.acquire() for _ in outcomes]
    for done, (probe, outcome) in enumerate(zip(probes, outcomes, strict=True), start=1):
        probe.record(outcome, duration_s=0.01)
        assert breaker.state is (expected if done >= decided_after else BreakerState.HALF_OPEN)
    if expected is BreakerState.OPEN:
        with pytest.raises(CircuitOpen) as caught:
            breaker.acquire()
        assert caught.value.retry_after_s == 2 * CONFIG.wait_s  # a failed round doubles the wait


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
    for bad in (
        {"consecutive_failures": -1},
        {"wait_multiplier": 0.5},
        {"max_wait_s": -1.0},
        {"wait_jitter": 1.0},
        {"wait_jitter": -0.1},
    ):
        with pytest.raises(ValueError):
            BreakerConfig(**bad)  # type: ignore[arg-type]


def test_defaults_one_probe_growing_jittered_waits_and_no_run_trip() -> None:
    config = BreakerConfig()
    assert config.half_open_probes == 1
    assert (config.wait_s, config.wait_multiplier, config.max_wait_s) == (5.0, 2.0, 60.0)
    assert config.wait_jitter == 0.2
    assert config.consecutive_failures == 0
    # A cap below the first wait never shortens it: the wait simply does not grow.
    assert BreakerConfig(wait_s=10.0, max_wait_s=3.0).wait_cap_s == 10.0


def test_one_probe_in_flight_refuses_everything_else_until_it_is_back() -> None:
    clock = ManualClock()
    breaker, hooks = make(clock, BreakerConfig(minimum_calls=10, wait_jitter=0.0))
    trip(breaker)
    clock.advance(5.0)
    probe = breaker.acquire()
    assert probe.probe
    assert breaker.probes_in_flight == 1
    for _ in range(50):
        with pytest.raises(CircuitOpen):
            breaker.acquire()
    assert hooks.rejected == 50
    probe.success(duration_s=0.05)
    assert breaker.state is BreakerState.CLOSED
    assert not breaker.acquire().probe


def test_a_probe_out_longer_than_the_slow_call_duration_reopens_before_it_returns() -> None:
    clock = ManualClock()
    breaker, hooks = make(clock, BreakerConfig(minimum_calls=10, slow_call_duration_s=0.8, wait_jitter=0.0))
    trip(breaker)
    clock.advance(5.0)
    probe = breaker.acquire()
    clock.advance(0.79)
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpen) as caught:
        breaker.acquire()
    assert caught.value.retry_after_s == pytest.approx(0.01)
    clock.advance(0.01)
    # Its duration can only grow: slow now, whatever it reports later (a hang times out at 1 s or more).
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after_s() == pytest.approx(10.0)
    clock.advance(0.2)
    probe.success()
    assert breaker.state is BreakerState.OPEN  # its late answer is no verdict
    assert hooks.calls[-1] == (Outcome.SUCCESS, pytest.approx(1.0))


def test_the_open_wait_doubles_per_failed_probe_up_to_the_cap_and_resets_on_close() -> None:
    clock = ManualClock()
    breaker, hooks = make(clock, BreakerConfig(minimum_calls=10, wait_jitter=0.0, max_wait_s=30.0))
    trip(breaker)
    waits = []
    for _ in range(5):
        waits.append(breaker.retry_after_s())
        clock.advance(breaker.retry_after_s())
        breaker.acquire().failure(duration_s=0.01)
        assert breaker.state is BreakerState.OPEN
    assert waits == [5.0, 10.0, 20.0, 30.0, 30.0]
    assert breaker.snapshot()["reopenings"] == 5
    assert breaker.snapshot()["open_wait_s"] == 30.0
    clock.advance(30.0)
    breaker.acquire().success(duration_s=0.01)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["reopenings"] == 0
    trip(breaker)
    assert breaker.retry_after_s() == 5.0  # a fresh outage starts from the base wait
    assert hooks.changes.count((BreakerState.HALF_OPEN, BreakerState.OPEN)) == 5


def test_the_open_wait_is_jittered_down_never_up() -> None:
    config = BreakerConfig(minimum_calls=10, wait_s=5.0, wait_jitter=0.2, max_wait_s=20.0)

    def waits(seed: int) -> list[float]:
        clock = ManualClock()
        breaker = CircuitBreaker("payments", config=config, clock=clock, rng=Random(seed))
        trip(breaker)
        seen = []
        for _ in range(4):
            seen.append(breaker.open_wait_s)
            clock.advance(breaker.open_wait_s + 1e-9)  # past it despite float rounding
            breaker.acquire().failure(duration_s=0.01)
        return seen

    first = waits(1)
    for wait, nominal in zip(first, [5.0, 10.0, 20.0, 20.0], strict=True):
        assert 0.8 * nominal <= wait <= nominal
    assert first == waits(1)  # the seeded Random makes it reproducible
    assert first != waits(2)
    assert len(set(first[2:])) == 2  # at the cap, each opening still draws its own jitter


def test_a_run_of_consecutive_failures_trips_whatever_the_window_holds() -> None:
    clock = ManualClock()
    config = BreakerConfig(minimum_calls=10, consecutive_failures=4, wait_jitter=0.0)
    breaker, _ = make(clock, config)
    feed(breaker, 100, Outcome.SUCCESS)  # a healthy dependency's calls fill the window
    feed(breaker, 3, Outcome.FAILURE)
    breaker.acquire().success(duration_s=0.01)  # a success breaks the run
    feed(breaker, 3, Outcome.FAILURE)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["consecutive_failures"] == 3
    breaker.acquire().ignore()  # refused before reaching the dependency: neither breaks nor extends it
    feed(breaker, 1, Outcome.FAILURE)
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot()["failure_rate"] == pytest.approx(7 / 108, abs=1e-4)  # far below 50 %
    # Without the run rule the same calls leave it closed.
    plain, _ = make(clock, BreakerConfig(minimum_calls=10))
    feed(plain, 100, Outcome.SUCCESS)
    feed(plain, 8, Outcome.FAILURE)
    assert plain.state is BreakerState.CLOSED


def test_a_registry_shares_its_random_and_hooks_added_later_see_every_breaker() -> None:
    clock = ManualClock()
    config = BreakerConfig(minimum_calls=10)
    registry = BreakerRegistry(defaults=config, clock=clock, rng=Random(3))
    early = registry.get("psp")
    late_hooks = Transitions()
    registry.add_hooks(late_hooks)
    late = registry.get("carrier")
    trip(early)
    trip(late)
    assert late_hooks.changes == [
        (None, BreakerState.CLOSED),  # "carrier" is born with it
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.CLOSED, BreakerState.OPEN),
    ]
    twin = BreakerRegistry(defaults=config, clock=clock, rng=Random(3))
    trip(twin.get("psp"))
    assert twin.get("psp").open_wait_s == early.open_wait_s


class BreakerMachine(RuleBasedStateMachine):
    """Random interleavings of admissions, outcomes and time; the invariants hold after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.hooks = Transitions()
        self.config = BreakerConfig(
            minimum_calls=4,
            consecutive_failures=3,
            window_s=4.0,
            window_buckets=4,
            wait_s=2.0,
            max_wait_s=8.0,
            half_open_probes=2,
            slow_call_duration_s=1.0,
        )
        self.breaker = CircuitBreaker(
            "dep", config=self.config, clock=self.clock, rng=Random(0), hooks=[self.hooks]
        )
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
            assert 0 <= snap["retry_after_s"] <= self.config.wait_cap_s

    @invariant()
    def open_wait_stays_within_its_jitter_and_cap(self) -> None:
        wait_s = self.breaker.open_wait_s
        assert (1 - self.config.wait_jitter) * self.config.wait_s <= wait_s <= self.config.wait_cap_s

    @invariant()
    def no_pending_probe_is_overdue(self) -> None:
        if self.breaker.state is BreakerState.HALF_OPEN:
            now = self.clock.monotonic()
            for permit in self.breaker._probes_pending:
                assert now - permit.started_s < self.config.slow_call_duration_s


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
