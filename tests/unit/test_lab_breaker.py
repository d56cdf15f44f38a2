"""The breaker experiment's arithmetic and plot, on hand-made observations (no servers)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from rich.console import Console

from mercato.config import CheckoutSettings
from mercato.lab.breaker import (
    BreakerOptions,
    ExperimentReport,
    RunResult,
    per_second,
    percentile_ms,
    phase_bounds,
    plot_report,
    report_table,
    summarize,
)

OPTIONS = BreakerOptions(outage_s=4.0, rate=2.0, duration_s=8.0, drain_s=2.0)  # outage [2, 6)

# The breaker trips at 2.4, a probe at 4.4 fails (reopens at 5.2), the probe at 6.8 closes it at 7.0.
TRANSITIONS = [
    (2.4, "closed", "open"),
    (4.4, "open", "half_open"),
    (5.2, "half_open", "open"),
    (6.8, "open", "half_open"),
    (7.0, "half_open", "closed"),
]


def _run(mode: str, outage_rps: float) -> RunResult:
    return RunResult(
        mode=mode,
        attempts=[
            (0.5, 0.010, "succeeded"),  # before
            (2.2, 1.000, "failed"),  # detection: hung until its timeout
            (2.5, 0.002, "failed"),  # open: refused at once
            (3.5, 0.004, "failed"),
            (4.4, 0.800, "failed"),  # the half-open probe
            (6.5, 0.001, "failed"),  # recovery, still open
            (7.0, 0.010, "succeeded"),
        ],
        checkouts=[(0.5, 0.2, "completed"), (2.4, 3.0, "compensated"), (7.0, 0.3, "completed")],
        starts=[(0.5, 0.005), (2.1, 0.006), (3.0, 0.004), (6.5, 0.007)],
        breaker_log=TRANSITIONS if mode == "on" else [],
        psp_rate=[(float(t), outage_rps if 2 < t <= 6 else 4.0) for t in range(1, 10)],
        psp_total=50,
        breaker_opened=2 if mode == "on" else 0,
        breaker_transitions=5 if mode == "on" else 0,
        read_breaker_rejections=2 if mode == "shared" else 0,
        compensations_refused=5 if mode == "shared" else 0,
    )


def test_percentile_is_nearest_rank_in_ms() -> None:
    assert percentile_ms([], 99) == 0.0
    assert percentile_ms([0.001, 0.002, 0.003, 0.004], 50) == 2.0
    assert percentile_ms([0.001, 0.002, 0.003, 0.004], 99) == 4.0


def test_the_outage_is_centred_and_must_fit_in_the_run() -> None:
    assert (OPTIONS.outage_start_s, OPTIONS.outage_end_s) == (2.0, 6.0)
    with pytest.raises(ValueError):
        BreakerOptions(outage_s=10, duration_s=10)


def test_hangs_and_every_variant_by_default_and_unknown_choices_are_refused() -> None:
    assert (OPTIONS.outage_mode, OPTIONS.variants) == ("hang", ("on", "shared", "off"))
    with pytest.raises(ValueError):
        BreakerOptions(outage_mode="slow")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BreakerOptions(variants=())
    with pytest.raises(ValueError):
        BreakerOptions(variants=("on", "sometimes"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BreakerOptions(breaker_half_open_probes=0)
    with pytest.raises(ValueError):
        BreakerOptions(breaker_consecutive_failures=-1)


def test_the_breaker_knobs_default_to_the_shops() -> None:
    shop = CheckoutSettings()
    assert OPTIONS.breaker_half_open_probes == shop.breaker_half_open_probes == 1
    assert OPTIONS.breaker_consecutive_failures == shop.breaker_consecutive_failures
    assert (OPTIONS.breaker_open_s, OPTIONS.breaker_max_open_s) == (
        shop.breaker_open_s,
        shop.breaker_max_open_s,
    )
    assert OPTIONS.breaker_minimum_calls == shop.breaker_minimum_calls


def test_summary_counts_only_what_happened_during_the_outage() -> None:
    row = summarize(_run("on", outage_rps=1.0), OPTIONS)
    assert (row["payment_outage_attempts"], row["payment_outage_slow_attempts"]) == (4, 2)
    assert row["payment_outage_p50_ms"] == 4.0
    assert row["payment_outage_p99_ms"] == 1000.0
    assert row["payment_p99_ms"] == 1000.0
    assert row["terminal_outage_p99_ms"] == 3000.0  # the checkout started at 2.4 s
    assert (row["terminal_p50_ms"], row["terminal_p99_ms"]) == (300.0, 3000.0)
    assert (row["checkout_start_p50_ms"], row["checkout_start_p99_ms"]) == (5.0, 7.0)
    assert row["psp_outage_rps"] == 1.0  # samples at 3, 4, 5, 6 cover the seconds (2, 6]
    assert row["statuses"] == {"completed": 2, "compensated": 1}
    assert (row["breaker_opened"], row["breaker_transitions"]) == (2, 5)


def test_phases_are_cut_at_the_first_trip_and_the_outage_end() -> None:
    run = _run("on", outage_rps=1.0)
    assert phase_bounds(run, OPTIONS) == {
        "before": (-math.inf, 2.0),
        "detection": (2.0, 2.4),
        "open": (2.4, 6.0),
        "recovery": (6.0, math.inf),
    }
    row = summarize(run, OPTIONS)
    assert row["trip_after_s"] == pytest.approx(0.4)
    assert row["reclosed_after_s"] == pytest.approx(1.0)  # the probe at 6.8 s closed it at 7.0 s
    phases = row["phases"]
    assert [phases[name]["payment_attempts"] for name in ("before", "detection", "open", "recovery")] == [
        1,
        1,
        3,
        2,
    ]
    # The hang that started before the trip is detection's cost; the probe is the open phase's.
    assert (phases["detection"]["payment_slow_attempts"], phases["detection"]["payment_p99_ms"]) == (
        1,
        1000.0,
    )
    assert phases["open"]["payment_slow_attempts"] == 1
    assert (phases["open"]["payment_p50_ms"], phases["open"]["payment_p99_ms"]) == (4.0, 800.0)
    assert (phases["recovery"]["payment_p50_ms"], phases["recovery"]["payment_p99_ms"]) == (1.0, 10.0)
    assert [
        phases[name]["checkout_start_p99_ms"] for name in ("before", "detection", "open", "recovery")
    ] == [
        5.0,
        6.0,
        4.0,
        7.0,
    ]
    # A sample at t is the second (t-1, t]: 3..6 are the open phase, none fits 0.4 s of detection.
    assert (phases["detection"]["psp_rps"], phases["open"]["psp_rps"]) == (None, 1.0)
    assert phases["recovery"]["psp_rps"] == 4.0
    assert phases["open"]["span_s"] == pytest.approx(3.6)


def test_without_a_breaker_the_whole_outage_is_detection() -> None:
    row = summarize(_run("off", outage_rps=20.0), OPTIONS)
    assert (row["trip_after_s"], row["reclosed_after_s"]) == (None, None)
    assert row["phases"]["detection"]["payment_attempts"] == 4
    assert row["phases"]["detection"]["span_s"] == 4.0
    assert row["phases"]["open"]["payment_attempts"] == 0
    assert row["phases"]["open"]["payment_p99_ms"] == 0.0


def test_per_second_series_the_table_and_the_plot(tmp_path: Path) -> None:
    series = per_second(_run("off", outage_rps=20.0), OPTIONS)
    assert series["t"][:3] == [0.0, 1.0, 2.0]
    assert series["payment_p99_ms"][0] == 10.0
    assert math.isnan(series["payment_p99_ms"][1])
    report = ExperimentReport(options=OPTIONS, runs=[_run("on", 1.0), _run("shared", 1.0), _run("off", 20.0)])
    body = report.to_dict()
    assert body["breaker_transitions"]["on"][0] == (2.4, "closed", "open")
    assert body["breaker_transitions"]["off"] == []
    rows = body["runs"]
    assert [row["mode"] for row in rows] == ["on", "shared", "off"]
    assert [row["read_breaker_rejections"] for row in rows] == [0, 2, 0]
    assert [row["compensations_refused"] for row in rows] == [0, 5, 0]
    console = Console(width=400, record=True)
    console.print(report_table(report))
    text = console.export_text()
    assert "recovery ms" in text
    assert "3 (1) 4 / 800" in text  # the on run's open phase: 3 attempts, 1 slow (the probe)
    assert "4 (2) 4 / 1,000" in text  # off: the whole outage is detection
    written = plot_report(report, tmp_path / "lab" / "breaker.png")
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
