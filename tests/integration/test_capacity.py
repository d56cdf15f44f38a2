"""`mercato capacity plan` against `mercato bench scale` on this machine (guide §22, §39).

The slow test runs a small `bench scale` (1 and 2 API processes behind HAProxy on PostgreSQL) as a
user would, then asks `capacity plan` for its prediction of each process count *from the other
count's measurement* (cross-validated): it must be within ±20 % of what was measured. The fast test
checks the plan's formulas on a report of the same shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mercato.bench.capacity import (
    costs_from_reports,
    cross_validated,
    plan_capacity,
    predicted_throughput,
)


def _report(path: Path, points: list[tuple[int, float, float, float]]) -> Path:
    data = {
        "kind": "bench-scale",
        "machine": {"cpus": 2},
        "workload": {"body_bytes": {"product-by-id": 400}},
        "products": 1000,
        "slo": {"p99_ms": 200.0, "max_errors": 0},
        "points": [
            {
                "processes": n,
                "max_rate": rate,
                "p50_ms": p50,
                "p99_ms": 150.0,
                "api_cpu_cores": cores,
                "steps": [
                    {"offered_rate": rate / 2, "achieved_rate": rate / 2, "p99_ms": 20.0, "errors": 0},
                    {"offered_rate": rate, "achieved_rate": rate, "p99_ms": 150.0, "errors": 0},
                ],
            }
            for n, rate, p50, cores in points
        ],
    }
    path.write_text(json.dumps(data))
    return path


def test_plan_formulas_on_a_measured_shape(tmp_path: Path) -> None:
    report = _report(
        tmp_path / "report.json", [(1, 400, 10.0, 0.8), (2, 700, 12.0, 1.5), (4, 1000, 15.0, 1.9)]
    )
    costs = costs_from_reports(report)
    assert costs.cpu_per_request_s == pytest.approx(0.002)
    plan = plan_capacity(costs, peak_rps=560, checkouts_per_s=0, headroom=0.3)
    # 560 / 0.7 = 800 req/s needed: 2 processes give 700 (measured and fitted), 3 are the first enough.
    assert predicted_throughput(costs, 2) < 800 <= predicted_throughput(costs, 3)
    assert plan.processes == 3
    assert plan.cores == pytest.approx(560 * 0.002 / 0.7)
    assert plan.db_connections == 8  # ceil(560 * 0.010 / 0.7)
    assert plan.redis_bytes == 1000 * 400 * 2 + 5600 * 200
    # A tighter latency target uses the highest 1-process step that met it: half the rate.
    tight = plan_capacity(costs, peak_rps=560, checkouts_per_s=0, p99_ms=50, headroom=0.3)
    assert tight.lambda_per_process == pytest.approx(costs.usl.lam / 2)
    assert tight.processes is None or tight.processes > 3
    # Cross-validated: N = 2 from N = 1 and 4 only (the curve through them), not from its own point.
    assert cross_validated(costs, 2) != pytest.approx(700, rel=1e-3)
    assert cross_validated(costs, 2) == pytest.approx(700, rel=0.2)
    with pytest.raises(ValueError, match="checkout"):
        plan_capacity(costs, peak_rps=10, checkouts_per_s=5)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_capacity_plan_predicts_bench_scale_within_20_percent(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a bench of minutes (two HAProxy fleets): run it with -m slow")
    out = tmp_path / "scale"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mercato.cli.main",
            "bench",
            "scale",
            "--processes",
            "1,2",
            "--duration-s",
            "3",
            "--warmup-s",
            "1",
            "--max-steps",
            "6",
            "--products",
            "200",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    plan = subprocess.run(
        [
            sys.executable,
            "-m",
            "mercato.cli.main",
            "capacity",
            "plan",
            "--peak-rps",
            "50",
            "--scale-report",
            str(out / "report.json"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert plan.returncode == 0, plan.stderr[-2000:]
    costs = json.loads(plan.stdout)["costs"]
    measured = {int(k): v for k, v in costs["measured_rps"].items()}
    predicted = {int(k): v for k, v in costs["cross_validated_rps"].items()}
    assert set(measured) == {1, 2}
    for n in (1, 2):
        assert predicted[n] == pytest.approx(measured[n], rel=0.20), (n, predicted, measured)
