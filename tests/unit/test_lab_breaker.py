"""The breaker experiment's arithmetic and plot, on hand-made observations (no servers)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mercato.lab.breaker import (
    BreakerOptions,
    ExperimentReport,
    RunResult,
    per_second,
    percentile_ms,
    plot_report,
    summarize,
)

OPTIONS = BreakerOptions(outage_s=4.0, rate=2.0, duration_s=8.0, drain_s=2.0)  # outage [2, 6)


def _run(mode: str, outage_rps: float) -> RunResult:
    return RunResult(
        mode=mode,
        attempts=[
            (0.5, 0.010, "succeeded"),
            (2.5, 0.002, "failed"),
            (3.5, 0.004, "failed"),
            (7.0, 0.010, "succeeded"),
        ],
        checkouts=[(0.5, 0.2, "completed"), (2.4, 3.0, "compensated"), (7.0, 0.3, "completed")],
        start_latencies_s=[0.005, 0.006],
        psp_rate=[(float(t), outage_rps if 2 < t <= 6 else 4.0) for t in range(1, 10)],
        psp_total=50,
        breaker_opened=1 if mode == "on" else 0,
        breaker_transitions=3 if mode == "on" else 0,
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


def test_summary_counts_only_what_happened_during_the_outage() -> None:
    row = summarize(_run("on", outage_rps=1.0), OPTIONS)
    assert row["payment_outage_p50_ms"] == 2.0
    assert row["payment_outage_p99_ms"] == 4.0
    assert row["payment_p99_ms"] == 10.0
    assert row["terminal_outage_p99_ms"] == 3000.0  # the checkout started at 2.4 s
    assert (row["terminal_p50_ms"], row["terminal_p99_ms"]) == (300.0, 3000.0)
    assert row["psp_outage_rps"] == 1.0  # samples at 3, 4, 5, 6 cover the seconds (2, 6]
    assert row["statuses"] == {"completed": 2, "compensated": 1}
    assert (row["breaker_opened"], row["breaker_transitions"]) == (1, 3)


def test_per_second_series_and_the_plot(tmp_path: Path) -> None:
    series = per_second(_run("off", outage_rps=20.0), OPTIONS)
    assert series["t"][:3] == [0.0, 1.0, 2.0]
    assert series["payment_p99_ms"][0] == 10.0
    assert math.isnan(series["payment_p99_ms"][1])
    report = ExperimentReport(options=OPTIONS, runs=[_run("on", 1.0), _run("shared", 1.0), _run("off", 20.0)])
    rows = report.to_dict()["runs"]
    assert [row["mode"] for row in rows] == ["on", "shared", "off"]
    assert [row["read_breaker_rejections"] for row in rows] == [0, 2, 0]
    assert [row["compensations_refused"] for row in rows] == [0, 5, 0]
    written = plot_report(report, tmp_path / "lab" / "breaker.png")
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
