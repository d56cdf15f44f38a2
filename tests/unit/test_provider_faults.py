"""The fault injector's draws: lognormal latency quantiles, outage windows, rates, determinism."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from pydantic import ValidationError

from mercato.kit.clock import ManualClock
from mercato.providers.faults import (
    Z_99,
    FaultInjector,
    FaultKind,
    FaultSettings,
    OutageWindow,
    lognormal_params,
)


def _within_binomial(count: int, n: int, p: float, z: float = 5.0) -> bool:
    mean = n * p
    return abs(count - mean) <= z * math.sqrt(n * p * (1 - p)) + 1


def test_lognormal_params_follow_the_documented_formula() -> None:
    mu, sigma = lognormal_params(50.0, 400.0)
    assert mu == pytest.approx(math.log(50.0))
    assert sigma == pytest.approx((math.log(400.0) - math.log(50.0)) / 2.3263, rel=1e-4)
    assert math.exp(mu + sigma * Z_99) == pytest.approx(400.0)


def test_sampled_latency_has_the_requested_median_and_p99() -> None:
    injector = FaultInjector(
        FaultSettings(latency_p50_ms=50, latency_p99_ms=400), clock=ManualClock(), rng=random.Random(7)
    )
    samples = sorted(injector.sample_latency_s() * 1000 for _ in range(40_000))
    p50 = samples[len(samples) // 2]
    p99 = samples[int(len(samples) * 0.99)]
    assert p50 == pytest.approx(50, rel=0.05)
    assert p99 == pytest.approx(400, rel=0.12)


def test_equal_quantiles_give_a_constant_delay_and_zero_gives_none() -> None:
    constant = FaultInjector(FaultSettings(latency_p50_ms=20, latency_p99_ms=20), clock=ManualClock())
    assert {round(constant.decide().latency_s, 9) for _ in range(50)} == {0.02}
    none = FaultInjector(FaultSettings(), clock=ManualClock())
    assert all(none.decide().latency_s == 0 for _ in range(50))


def test_rates_are_respected_within_binomial_bounds() -> None:
    n = 20_000
    settings = FaultSettings(error_rate=0.1, hang_rate=0.05, lost_response_rate=0.2, seed=11)
    injector = FaultInjector(settings, clock=ManualClock())
    decisions = [injector.decide() for _ in range(n)]
    counts = {kind: sum(1 for d in decisions if d.kind is kind) for kind in FaultKind}
    assert _within_binomial(counts[FaultKind.ERROR], n, 0.1)
    assert _within_binomial(counts[FaultKind.HANG], n, 0.05)
    assert _within_binomial(counts[FaultKind.LOST_RESPONSE], n, 0.2)
    assert _within_binomial(counts[FaultKind.NONE], n, 0.65)
    statuses = [d.status for d in decisions if d.kind is FaultKind.ERROR]
    assert set(statuses) == {500, 503}
    assert _within_binomial(statuses.count(503), len(statuses), 0.5)
    assert all(d.retry_after_s == 1 for d in decisions if d.status == 503)
    assert not any(d.responds for d in decisions if d.kind in (FaultKind.HANG, FaultKind.LOST_RESPONSE))


def test_the_same_seed_replays_the_same_faults() -> None:
    settings = FaultSettings(error_rate=0.3, hang_rate=0.1, latency_p50_ms=10, latency_p99_ms=100, seed=3)
    first = [FaultInjector(settings, clock=ManualClock()).decide() for _ in range(1)]
    a = FaultInjector(settings, clock=ManualClock())
    b = FaultInjector(settings, clock=ManualClock())
    assert [a.decide() for _ in range(500)] == [b.decide() for _ in range(500)]
    # Re-applying seeded settings restarts the sequence from the top.
    a.update(settings)
    assert a.decide() == first[0]


def test_outage_windows_are_relative_to_when_settings_were_applied() -> None:
    clock = ManualClock()
    clock.advance(1000)  # the origin is "when applied", not the clock's zero
    injector = FaultInjector(FaultSettings(outages=[OutageWindow(start_s=2, end_s=5)], seed=1), clock=clock)
    assert injector.decide().kind is FaultKind.NONE
    clock.advance(2)
    inside = injector.decide()
    assert (inside.kind, inside.status, inside.retry_after_s) == (FaultKind.OUTAGE, 503, 3)
    clock.advance(2.5)
    assert injector.decide().retry_after_s == 1
    clock.advance(0.5)  # end is exclusive
    assert injector.decide().kind is FaultKind.NONE


def test_a_hang_outage_leaves_every_request_unanswered_for_its_window() -> None:
    clock = ManualClock()
    windows = [OutageWindow(start_s=1, end_s=3, mode="hang"), OutageWindow(start_s=5, end_s=6)]
    injector = FaultInjector(FaultSettings(outages=windows, error_rate=1.0, seed=1), clock=clock)
    assert injector.decide().kind is FaultKind.ERROR
    clock.advance(1)
    hung = injector.decide()
    assert (hung.kind, hung.responds, hung.latency_s) == (FaultKind.HANG, False, 0.0)
    assert injector.outage_remaining_s() == pytest.approx(2)
    clock.advance(4)  # the second window is the default kind: fast 503s
    assert injector.decide().kind is FaultKind.OUTAGE


def test_outage_for_is_an_outage_starting_now_and_update_restarts_the_windows() -> None:
    clock = ManualClock()
    injector = FaultInjector(FaultSettings(outage_for_s=10), clock=clock)
    assert injector.decide().kind is FaultKind.OUTAGE
    assert injector.outage_remaining_s() == pytest.approx(10)
    clock.advance(10)
    assert injector.decide().kind is FaultKind.NONE
    injector.update(FaultSettings(outage_for_s=10))
    assert injector.decide().kind is FaultKind.OUTAGE
    # An outage wins over every other fault and draws no latency.
    injector.update(FaultSettings(outage_for_s=1, error_rate=1.0, latency_p50_ms=100, latency_p99_ms=100))
    decision = injector.decide()
    assert (decision.kind, decision.latency_s) == (FaultKind.OUTAGE, 0.0)


@pytest.mark.parametrize(
    "settings",
    [
        {"error_rate": 0.6, "hang_rate": 0.3, "lost_response_rate": 0.2},
        {"error_rate": 1.5},
        {"latency_p50_ms": 100, "latency_p99_ms": 50},
        {"latency_p99_ms": 50},
        {"outages": [{"start_s": 5, "end_s": 5}]},
        {"outage_for_s": 0},
        {"unknown_knob": 1},
    ],
)
def test_inconsistent_settings_are_rejected(settings: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        FaultSettings.model_validate(settings)


def test_median_of_mean_check_guards_against_a_wrong_parameterisation() -> None:
    # The mean of a lognormal is exp(mu + sigma²/2): above the median whenever there is a tail.
    injector = FaultInjector(
        FaultSettings(latency_p50_ms=50, latency_p99_ms=400), clock=ManualClock(), rng=random.Random(5)
    )
    samples = [injector.sample_latency_s() * 1000 for _ in range(40_000)]
    mu, sigma = lognormal_params(50, 400)
    assert statistics.fmean(samples) == pytest.approx(math.exp(mu + sigma**2 / 2), rel=0.08)
