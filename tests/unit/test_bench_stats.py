"""Latency accounting from the intended send time, percentiles, the SLO verdict and ratios."""

from __future__ import annotations

import json

import pytest

from mercato.bench.stats import Counts, LatencyHistogram, Slo, StepResult, achieved_rate, ratio


def _step(
    latencies_ms: list[float], *, rate: float = 100.0, span_s: float = 1.0, **counts: int
) -> StepResult:
    hist = LatencyHistogram()
    for ms in latencies_ms:
        hist.record_s(ms / 1000)
    ok = counts.pop("ok", len(latencies_ms))
    return StepResult(
        target="t",
        offered_rate=rate,
        span_s=span_s,
        counts=Counts(scheduled=ok, sent=ok, ok=ok, first_due_s=10.0, last_done_s=10.0 + span_s, **counts),
        histogram=hist,
    )


def test_percentiles_of_a_known_distribution_within_hdr_precision() -> None:
    step = _step([float(i) for i in range(1, 101)])  # 1..100 ms
    assert step.p50_ms == pytest.approx(50, rel=1e-3)
    assert step.p95_ms == pytest.approx(95, rel=1e-3)
    assert step.p99_ms == pytest.approx(99, rel=1e-3)
    assert step.max_ms == pytest.approx(100, rel=1e-3)


def test_a_stall_shows_in_the_tail_when_measured_from_intended_time() -> None:
    # 100 req/s for 1 s; the server stalls 500 ms at t=0.5: requests due during the stall all
    # complete when it ends. From the intended time they waited up to 500 ms; timed from the
    # actual send of a closed-loop client only one request would have looked slow.
    intended = [i / 100 for i in range(100)]
    done = [max(t, 1.0) + 0.001 if 0.5 <= t < 1.0 else t + 0.001 for t in intended]
    hist = LatencyHistogram()
    for t, d in zip(intended, done, strict=True):
        hist.record_s(d - t)
    assert hist.percentile_ms(50) >= 1.0
    assert hist.percentile_ms(75) >= 200
    assert hist.max_ms == pytest.approx(501, rel=1e-2)


def test_histograms_merge_across_processes_through_their_encoding() -> None:
    a, b = LatencyHistogram(), LatencyHistogram()
    for _ in range(90):
        a.record_s(0.001)
    for _ in range(10):
        b.record_s(0.2)
    merged = LatencyHistogram.merged([a.encode(), b.encode()])
    assert merged.count == 100
    assert merged.percentile_ms(90) == pytest.approx(1.0, rel=1e-2)
    assert merged.percentile_ms(99) == pytest.approx(200.0, rel=1e-2)


def test_out_of_range_values_are_clamped_not_lost() -> None:
    hist = LatencyHistogram()
    hist.record_s(0.0)
    hist.record_s(10_000.0)
    assert hist.count == 2
    assert LatencyHistogram().percentile_ms(99) == 0.0


def test_counts_merge_is_additive_and_keeps_the_extremes() -> None:
    a = Counts(scheduled=5, sent=5, ok=4, non_2xx=1, non_2xx_statuses={503: 1}, late_sends=2,
               max_dispatch_lag_s=0.003, first_due_s=1.0, last_done_s=3.0, cpu_s=0.5, wall_s=2.0)  # fmt: skip
    b = Counts(scheduled=5, sent=4, ok=3, transport_errors=1, timeouts=1, max_dispatch_lag_s=0.001,
               first_due_s=1.001, last_done_s=4.0, cpu_s=0.25, wall_s=2.5)  # fmt: skip
    m = a.merge(b)
    assert (m.scheduled, m.sent, m.ok, m.errors, m.finished) == (10, 9, 7, 3, 10)
    assert (m.first_due_s, m.last_done_s, m.max_dispatch_lag_s) == (1.0, 4.0, 0.003)
    assert (m.cpu_s, m.wall_s) == (0.75, 2.5)
    assert Counts().merge(a).first_due_s == 1.0  # an empty share does not drag the start to 0
    assert m.non_2xx_statuses == {503: 1}
    assert Counts.from_dict(m.to_dict()) == m
    assert Counts.from_dict(json.loads(json.dumps(m.to_dict()))) == m  # as a generator process sends it


def test_achieved_rate_never_exceeds_offered_and_drops_when_the_server_lags() -> None:
    assert achieved_rate(ok=100, span_s=1.0, first_due_s=0.0, last_done_s=0.995) == 100.0
    assert achieved_rate(ok=100, span_s=1.0, first_due_s=0.0, last_done_s=2.0) == 50.0
    assert achieved_rate(ok=0, span_s=0.0, first_due_s=0.0, last_done_s=0.0) == 0.0


def test_ratio() -> None:
    assert ratio(500.0, 2000.0) == 0.25
    assert ratio(None, 2000.0) is None
    assert ratio(500.0, None) is None
    assert ratio(500.0, 0.0) is None


def test_slo_verdicts() -> None:
    slo = Slo(p99_ms=100)
    assert slo.passes(_step([5.0] * 100))
    assert "p99" in slo.violations(_step([5.0] * 98 + [150.0] * 2))[0]
    assert slo.violations(_step([5.0] * 100, timeouts=1)) == ["1 errors"]
    slow = _step([5.0] * 100)
    slow.counts.last_done_s = slow.counts.first_due_s + 2.0  # 100 ok over 2 s at 100/s offered
    assert slo.violations(slow) == ["achieved 50/s < 95% of 100/s"]
    assert slo.violations(_step([])) == ["no responses", "achieved 0/s < 95% of 100/s"]


def test_server_cpu_per_request_is_the_steps_cpu_over_its_answered_requests() -> None:
    step = _step([1.0] * 2_000)
    step.server_cpu_s = 0.3
    assert step.cpu_us_per_request == pytest.approx(150.0)
    assert step.to_dict()["server_cpu_us_per_request"] == 150.0
    assert _step([]).cpu_us_per_request is None  # no server CPU measured
    idle = _step([], ok=0)
    idle.server_cpu_s = 0.3
    assert idle.cpu_us_per_request is None  # nothing answered
