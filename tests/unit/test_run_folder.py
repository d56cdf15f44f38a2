"""Labs and benches write to a run folder, never over committed files: a clone stays clean after a run.

The end-to-end checks run the quickest lab (`lab delivery`, a few seconds on a tiny parameter set) and
the quickest bench (`bench streams` on the SQL log alone) in a fresh git repository that carries this
repository's `.gitignore`, from its root, as a new user would.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from rich.table import Table
from typer.testing import CliRunner

from mercato.bench.cli import app as bench_app
from mercato.bench.harness import RunFolder, check_docs_target
from mercato.lab.cli import app as lab_app

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def _git(cwd: Path, *args: str) -> str:
    git = shutil.which("git")
    assert git is not None
    done = subprocess.run(
        [git, "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


@pytest.fixture
def clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh repository with this one's .gitignore and a committed docs/lab figure, as the cwd."""
    root = tmp_path / "clone"
    (root / "docs" / "lab").mkdir(parents=True)
    shutil.copyfile(REPO / ".gitignore", root / ".gitignore")
    (root / "docs" / "lab" / "delivery.png").write_bytes(PNG + b"committed")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "fresh clone")
    monkeypatch.chdir(root)
    return root


def _mercato(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mercato ARGS` as a user runs it: a process of its own (nothing of this test process's state),
    from `cwd`, bounded in time."""
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


def test_a_lab_run_leaves_the_clone_clean_and_fills_its_run_folder(clone: Path) -> None:
    result = _mercato(clone, "lab", "delivery", "--messages", "10", "--duplicates", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _git(clone, "status", "--porcelain", "--untracked-files=all") == ""
    [run] = (clone / "lab-results" / "delivery").iterdir()
    assert {p.name for p in run.iterdir()} == {"report.json", "table.txt", "verdict.txt", "result.json"}
    results = json.loads((run / "report.json").read_text())["results"]
    assert {r["runner"] for r in results} == {"consumer + inbox", "projector + checkpoint"}
    assert all(r["duplicates_applied"] == 0 and r["missing"] == 0 for r in results)
    assert "duplicates seen" in (run / "verdict.txt").read_text()
    assert "consumer + inbox" in (run / "table.txt").read_text()
    # The committed figure was not touched.
    assert (clone / "docs" / "lab" / "delivery.png").read_bytes() == PNG + b"committed"


def test_a_bench_run_leaves_the_clone_clean_and_honours_out(clone: Path, tmp_path: Path) -> None:
    args = ["streams", "--backends", "sqlite", "--messages", "100", "--batch", "50"]
    default = _mercato(clone, "bench", *args)
    assert default.returncode == 0, default.stdout + default.stderr
    assert _git(clone, "status", "--porcelain", "--untracked-files=all") == ""
    [run] = (clone / "lab-results" / "bench-streams").iterdir()
    [row] = json.loads((run / "report.json").read_text())["results"]
    assert row["backend"] == "sql-log (SQLite)"
    assert row["ours_per_s"] > 0

    chosen = tmp_path / "elsewhere" / "run-1"
    custom = _mercato(clone, "bench", *args, "--out", str(chosen))
    assert custom.returncode == 0, custom.stdout + custom.stderr
    assert {p.name for p in chosen.iterdir()} == {"report.json", "table.txt", "result.json"}
    assert len(list((clone / "lab-results" / "bench-streams").iterdir())) == 1


def test_update_docs_is_refused_before_the_run_outside_the_repository_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(lab_app, ["ratelimit", "--no-redis", "--update-docs"])
    assert result.exit_code == 2
    assert "--update-docs" in result.output
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written


def test_run_folders_are_timestamped_and_never_reused(tmp_path: Path) -> None:
    now = dt.datetime(2026, 12, 6, 1, 2, 3, tzinfo=dt.UTC)
    first = RunFolder.open("breaker", root=tmp_path, now=now)
    second = RunFolder.open("breaker", root=tmp_path, now=now)
    assert first.path == tmp_path / "breaker" / "20261206T010203Z"
    assert second.path == tmp_path / "breaker" / "20261206T010203Z-2"
    assert first.figure == first.path / "breaker.png"


def test_a_run_folder_records_table_json_verdict_and_publishes_the_figure_only_when_asked(
    tmp_path: Path,
) -> None:
    docs = tmp_path / "docs" / "lab"
    docs.mkdir(parents=True)
    run = RunFolder.open("overload", tmp_path / "run")
    run.figure.write_bytes(PNG + b"new")
    table = Table(title="t")
    table.add_column("shedding")
    table.add_row("[green]on[/green]")

    written = run.record(data={"goodput": 1.5}, tables=[table], verdict=["shedding on: ok"])
    assert {p.name for p in written} == {
        "report.json",
        "table.txt",
        "verdict.txt",
        "overload.png",
        "result.json",
    }
    result = json.loads((run.path / "result.json").read_text())
    assert result["name"] == "overload"
    assert result["verdict"] == ["shedding on: ok"]
    assert result["held"] is None  # the line judges nothing
    assert result["figure"] == "overload.png"
    assert json.loads((run.path / "report.json").read_text()) == {"goodput": 1.5}
    text = (run.path / "table.txt").read_text()
    assert "on" in text
    assert "\x1b[" not in text  # plain text, no colour codes
    assert (run.path / "verdict.txt").read_text() == "shedding on: ok\n"
    assert not (docs / "overload.png").exists()

    assert run.publish_figure(docs_dir=docs) == docs / "overload.png"
    assert (docs / "overload.png").read_bytes() == PNG + b"new"
    with pytest.raises(typer.BadParameter):
        check_docs_target("overload", docs_dir=tmp_path / "nowhere")


@pytest.mark.parametrize("app", [lab_app, bench_app], ids=["lab", "bench"])
def test_every_lab_and_bench_command_writes_through_the_harness(app: typer.Typer) -> None:
    """Each subcommand takes the harness's `--out` (default: a new ./lab-results/<name>/<UTC time>/), so none
    keeps its own output path; the ones that draw a figure also take `--update-docs`."""
    group = typer.main.get_group(app)
    assert group.commands, "no subcommands found"
    for name, command in group.commands.items():
        if name == "list":
            continue  # the catalogue (`mercato lab list`), not an experiment
        params = {param.name: param for param in command.params}
        out = params.get("out")
        assert out is not None, f"{name} has no --out"
        assert out.default is None, f"{name} has its own output path {out.default}"
        assert "lab-results/<name>/<UTC time>" in (getattr(out, "help", None) or ""), name
    figures = {"breaker", "network", "outage", "overload", "ratelimit"}
    if app is lab_app:
        drawn = {n for n, c in group.commands.items() if "update_docs" in {p.name for p in c.params}}
        assert figures <= drawn
