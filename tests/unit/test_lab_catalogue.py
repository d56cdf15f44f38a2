"""`mercato lab list`: every experiment with the guide's claim it tests and its latest result, read
from the run folders the shared harness writes (`result.json`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer

from mercato.bench.harness import RunFolder, judge, latest_result
from mercato.lab.cli import LABS
from mercato.lab.cli import app as lab_app


def _mercato(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    return subprocess.run(
        [sys.executable, "-m", "mercato.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_every_registered_experiment_is_in_the_catalogue_with_a_claim() -> None:
    commands = set(typer.main.get_group(lab_app).commands) - {"list"}
    assert {lab.name for lab in LABS} == commands
    for lab in LABS:
        assert len(lab.claim) > 40, lab.name
        assert lab.guide.startswith("§"), lab.name
    assert len({lab.claim for lab in LABS}) == len(LABS)  # one claim per lab, stated once


def test_verdict_lines_are_judged_held_did_not_hold_or_not_judged() -> None:
    assert judge(["verdict: HELD", "ok  no 500s"]) is True
    assert judge(["orders: holds (10 checked, 0 violations)", "stock: VIOLATED (3 violations)"]) is False
    assert judge(["verdict: DID NOT HOLD"]) is False
    assert judge(["Failover: PASS"]) is True
    assert judge(["goodput 120/s"]) is None


def test_the_latest_run_wins_and_runs_from_before_result_json_still_count(tmp_path: Path) -> None:
    assert latest_result("outage", root=tmp_path) is None
    old = tmp_path / "outage" / "20260101T000000Z"
    old.mkdir(parents=True)
    (old / "verdict.txt").write_text("claim: x\nverdict: DID NOT HOLD\n")
    found = latest_result("outage", root=tmp_path)
    assert found is not None
    assert found["held"] is False
    assert found["run"] == "20260101T000000Z"
    new = RunFolder.open("outage", tmp_path / "outage" / "20260102T000000Z")
    new.record(data={}, verdict=["verdict: HELD"])
    found = latest_result("outage", root=tmp_path)
    assert found is not None
    assert (found["held"], found["run"], found["verdict"]) == (True, "20260102T000000Z", ["verdict: HELD"])


def test_lab_list_prints_every_claim_and_a_real_runs_result(tmp_path: Path) -> None:
    before = _mercato(tmp_path, "lab", "list", "--json")
    assert before.returncode == 0, before.stderr
    entries = json.loads(before.stdout)
    assert [e["name"] for e in entries] == [lab.name for lab in LABS]
    assert all(e["latest"] is None for e in entries)

    run = _mercato(tmp_path, "lab", "delivery", "--messages", "10", "--duplicates", "2")
    assert run.returncode == 0, run.stderr
    after = {e["name"]: e for e in json.loads(_mercato(tmp_path, "lab", "list", "--json").stdout)}
    delivery = after["delivery"]["latest"]
    assert delivery is not None
    assert delivery["held"] is True
    assert any("0 applied" in line for line in delivery["verdict"])
    assert Path(delivery["path"]).parent == tmp_path / "lab-results" / "delivery"

    text = _mercato(tmp_path, "lab", "list").stdout
    for lab in LABS:
        assert lab.name in text
    assert "held (" in text
    assert "never run" in text
    assert "duplicates" in text  # the claim of the delivery lab, as registered
