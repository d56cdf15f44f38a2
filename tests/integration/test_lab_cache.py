"""The cache labs, small: each fills its run folder, and their measurements say what the ADRs claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mercato.cli.main import app


def test_lab_cache_policy_fills_its_run_folder_and_tinylfu_beats_lru(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["lab", "cache-policy", "--keys", "1000", "--requests", "10000", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    for name in ("report.json", "table.txt", "verdict.txt", "cache-policy.png"):
        assert (out / name).is_file(), name
    points = json.loads((out / "report.json").read_text())["points"]
    hit = {(p["workload"], p["policy"], p["size_percent"]): p["hit_ratio"] for p in points}
    for workload in ("zipf", "zipf+scan", "zipf-shift"):
        assert hit[(workload, "W-TinyLFU", 1.0)] > hit[(workload, "LRU", 1.0)], workload


@pytest.mark.slow
def test_lab_stampede_counts_one_load_per_process_with_single_flight(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("eight runs across a key's expiry: run it with -m slow")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["lab", "stampede", "--requests", "200", "--processes", "2", "--fresh-s", "1", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert (out / "stampede.png").is_file()
    rows = {
        (r["pattern"], r["strategy"]): r for r in json.loads((out / "report.json").read_text())["results"]
    }
    assert rows[("burst", "no guard")]["origin_loads"] > 20
    assert rows[("burst", "single-flight")]["origin_loads"] <= 2
    assert rows[("steady", "single-flight + XFetch")]["origin_loads"] <= 2
