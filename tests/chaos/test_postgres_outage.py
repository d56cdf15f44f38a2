"""PostgreSQL stopped for 10 s under steady load (`mercato lab outage`): 0 answers 500, every failure a 503
with Retry-After, none slower than the request deadline, and the API recovers by itself. Run as a user runs
it, through the command, into the run folder the lab harness gives it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mercato.lab.cli import app as lab_app

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kill", [False, True], ids=["fast-shutdown", "kill-9"])
def test_a_10_s_postgres_outage_under_load_is_503s_and_recovers(kill: bool, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["outage", "--outage-s", "10", "--warmup-s", "3", "--after-s", "6", "--deadline-s", "5"]
    result = CliRunner().invoke(lab_app, [*args, *(["--kill"] if kill else []), "--out", str(run)])
    assert {p.name for p in run.iterdir()} == {
        "report.json",
        "table.txt",
        "verdict.txt",
        "outage.png",
        "result.json",
    }
    report = json.loads((run / "report.json").read_text())
    assert report["errors_500"] == 0, report["by_status"]
    assert set(report["by_status"]) == {"200", "503"}, report["by_status"]
    assert report["unavailable_without_retry_after"] == 0
    assert report["no_answer"] == 0
    assert report["max_latency_s"] <= 5.0
    assert report["by_status"]["503"] > 0, "the outage was seen"
    assert report["recovery_s"] is not None, "served again after the restart"
    assert report["recovery_s"] <= 5.0
    # The figure's buckets are on the same clock as the outage: no 503 a second before the stop.
    first_503 = min(b["t_s"] for b in report["buckets"] if "503" in b["by_status"])
    assert first_503 >= report["down_at_s"] - 1.0
    assert report["ok"]
    assert result.exit_code == 0, result.output
    assert "verdict: HELD" in (run / "verdict.txt").read_text()
    assert (run / "outage.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
