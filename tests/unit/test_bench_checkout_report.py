"""The pure parts of `mercato bench checkout`: rate ladder, completion accounting, report maths."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mercato.bench.checkout_report import (
    DEFAULT_RATES,
    LOAD_GENERATOR,
    MACHINE,
    POSTGRESQL,
    BaselineStep,
    CheckoutStep,
    SagaOutcome,
    account_completions,
    delta,
    index_of,
    mean_by_key,
    per_checkout,
    rate_ladder,
    request_id,
)
from mercato.bench.servers import command_cpu_s
from mercato.bench.stats import Counts, LatencyHistogram


def test_rate_ladder_defaults_sorts_and_dedupes() -> None:
    assert rate_ladder() == DEFAULT_RATES
    assert rate_ladder([200, 25, 100, 25.0]) == (25.0, 100.0, 200.0)


@pytest.mark.parametrize("bad", [[], [0], [-5], [float("nan")], [float("inf")]])
def test_rate_ladder_rejects_nonsense(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        rate_ladder(bad)


def test_request_id_round_trips_and_ignores_other_steps() -> None:
    assert index_of("ck1xab", request_id("ck1xab", 42)) == 42
    assert index_of("ck1xab", "ck2xab-42") is None
    assert index_of("ck1xab", "ck1xab-42.cart") is None
    assert index_of("ck1", "ck12-3") is None  # a longer tag sharing the prefix is another step


def _outcome(tag: str, index: int, status: str, finished: float | None) -> SagaOutcome:
    return SagaOutcome(correlation_id=request_id(tag, index), status=status, finished_wall_s=finished)


def test_every_accepted_checkout_is_accounted_once() -> None:
    accepted = {0: 100.0, 1: 100.5, 2: 101.0, 3: 101.5, 4: 102.0}
    outcomes = [
        _outcome("t", 0, "completed", 100.25),
        _outcome("t", 0, "completed", 109.0),  # a duplicate row must not count twice
        _outcome("t", 1, "completed", 101.5),
        _outcome("t", 2, "compensated", 101.2),
        _outcome("t", 3, "running", None),
        _outcome("t", 9, "completed", 103.0),  # not accepted by the client (e.g. its 202 timed out)
        _outcome("other", 4, "completed", 103.0),  # another step's saga
    ]
    done = account_completions(tag="t", accepted=accepted, outcomes=outcomes)
    assert (done.completed, done.compensated, done.failed, done.unfinished, done.unknown) == (2, 1, 0, 1, 1)
    assert done.accounted == len(accepted)
    assert done.histogram.count == 2
    assert done.histogram.percentile_ms(100) == pytest.approx(1000.0, rel=1e-3)  # 100.5 -> 101.5
    assert done.histogram.percentile_ms(0) == pytest.approx(250.0, rel=1e-3)
    assert done.last_finished_wall_s == 101.5


def test_per_checkout_and_delta() -> None:
    before = {"api:POST checkout": 10, "saga:load": 4}
    after = {"api:POST checkout": 40, "saga:load": 4, "saga:claim": 6}
    moved = delta(after, before)
    assert moved == {"api:POST checkout": 30, "saga:claim": 6}
    assert per_checkout(moved, 3) == {"api:POST checkout": 10.0, "saga:claim": 2.0}
    assert per_checkout(moved, 0) == {}


def test_mean_by_key() -> None:
    assert mean_by_key([("a", 1.0), ("b", 4.0), ("a", 3.0)]) == {"a": 2.0, "b": 4.0}


def _step(*, rate: float, completed: int, last_finished: float, accepted: int) -> CheckoutStep:
    tag = "t"
    accepted_at = {i: 1000.0 + i / rate for i in range(accepted)}
    outcomes = [
        _outcome(tag, i, "completed", last_finished if i == completed - 1 else 1000.0 + i / rate)
        for i in range(completed)
    ]
    counts = Counts(scheduled=accepted, sent=accepted, ok=accepted, first_due_s=50.0, last_done_s=52.0)
    base_hist = LatencyHistogram()
    base_hist.record_s(0.002)
    accept = LatencyHistogram()
    accept.record_s(0.030)
    return CheckoutStep(
        offered_rate=rate,
        span_s=accepted / rate,
        counts=counts,
        accept=accept,
        post=LatencyHistogram(),
        completion=account_completions(tag=tag, accepted=accepted_at, outcomes=outcomes),
        first_due_wall_s=1000.0,
        baseline=BaselineStep(counts=Counts(scheduled=1, ok=1), histogram=base_hist),
        statements={"api:POST checkout": 15 * completed, "saga:load": 6 * completed},
    )


def test_completed_rate_stretches_when_the_backlog_drains_late() -> None:
    on_time = _step(rate=100, completed=200, last_finished=1002.0, accepted=200)
    assert on_time.completed_rate == pytest.approx(100.0)
    assert not on_time.saturated
    # The last saga finished 8 s after a 2 s schedule began: 200 completions over 8 s.
    late = _step(rate=100, completed=200, last_finished=1008.0, accepted=200)
    assert late.completed_rate == pytest.approx(25.0)
    assert late.saturated


def test_report_dict_is_consistent() -> None:
    step = _step(rate=50, completed=100, last_finished=1002.0, accepted=100)
    data = step.to_dict()
    assert data["checkouts"]["accepted"] == 100
    assert sum(data["sagas"].values()) == data["checkouts"]["accepted"]
    assert data["statements_per_checkout"] == {"api:POST checkout": 15.0, "saga:load": 6.0}
    assert data["accept_p50_vs_bare_p50"] == pytest.approx(15.0, rel=0.01)  # 30 ms vs 2 ms
    assert data["accepted_rate"] == pytest.approx(50.0)


def test_system_cpu_is_the_machine_less_the_load_generator() -> None:
    step = _step(rate=50, completed=100, last_finished=1002.0, accepted=100)
    assert step.system_cpu_s is None
    assert step.to_dict()["system_cpu_ms_per_checkout"] is None
    step.server_cpu_s = {"api": 0.7, POSTGRESQL: 0.9, LOAD_GENERATOR: 0.5, MACHINE: 3.5}
    assert step.system_cpu_s == pytest.approx(3.0)
    assert step.to_dict()["system_cpu_ms_per_checkout"] == pytest.approx(30.0)  # 3 s over 100


def test_a_command_s_cpu_counts_its_processes() -> None:
    # This test's own process burns CPU, so every process named as it is has at least that much.
    own = Path("/proc/self/comm").read_text().strip()
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert command_cpu_s(own) >= 0.05
    assert command_cpu_s("no-such-command-here") == 0.0
