"""`mercato lab balancing` runs as a user runs it (a short client-side pass) and fills its run folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _only_with_slow(request: pytest.FixtureRequest) -> None:
    """Minutes of real processes: behind the marker (`pytest -m slow`)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a drill of real processes: run it with -m slow")


def test_the_client_side_pass_writes_table_json_verdict_and_figure(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "mercato.cli.main", "lab", "balancing", "--side", "client"]
    argv += ["--duration-s", "2", "--concurrency", "4", "--slow-ms", "200", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = {r["algorithm"]: r for r in report["results"]}
    assert set(rows) == {"round_robin", "least_outstanding", "p2c"}
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in rows.values())
    # Round robin cannot avoid the slow one; a least-loaded choice sends it less.
    assert rows["round_robin"]["slow_share"] > 0.3
    assert rows["least_outstanding"]["slow_share"] < rows["round_robin"]["slow_share"]
    assert (out / "balancing.png").stat().st_size > 1000
    assert "claim" in (out / "verdict.txt").read_text()
