"""``mercato lab canary``: does the SLO-gated canary promote a healthy release and catch a bad one?

Hypothesis (guide §16: "5 %/20 %/50 %/100 % canary ramp ... metrics/alerts gating"): ramping a new
version through HAProxy's weights while comparing its error rate and p99 with the stable group's,
from the processes' own /metrics, (a) takes a healthy release to 100 % and (b) rolls a release that
fails 5 % of its requests back to 0 % automatically, after few requests saw it.

Set-up (lab/canary_fleet.py): one stable `mercato api` process (release 1.0), one canary process
(release 1.1: the new word search, flag `catalog.search_v2` targeted at the canary track) and one
bad canary (release 1.1 built with `MERCATO_RELEASE_INJECT_ERROR_RATIO=0.05`), all behind a real
HAProxy; `rate` searches per second through HAProxy during both releases (`mercato release canary`'s
own code, cluster/release.py). Measured: outcome, time to detect (release start to rollback),
requests served by the new version, 5xx answers, and the error budget they spent (SLO 99.9 %
availability: 0.1 % of the run's requests).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mercato.bench.harness import OutOption, RunFolder, UpdateDocsOption, check_docs_target
from mercato.cluster.release import Slo, run_canary, set_group_weights
from mercato.lab.canary_fleet import FleetMember, LoadGenerator, ReleaseFleet, Sample

__all__ = ["ScenarioResult", "canary_command"]

NAME = "canary"
SLO_AVAILABILITY = 0.999


@dataclass
class ScenarioResult:
    scenario: str
    outcome: str
    reason: str
    last_step: int
    detect_s: float | None
    requests: int
    new_version_requests: int
    errors: int
    error_rate: float
    budget_spent_pct: float
    breach: bool
    steps: list[dict[str, Any]]
    timeline: list[tuple[float, int]]  # (seconds from start, canary weight)
    errors_at: list[float]  # seconds from start of each 5xx


def _scenario(
    fleet: ReleaseFleet, name: str, canary_member: str, *, steps: list[int], interval_s: float, rate: float
) -> ScenarioResult:
    deployment = fleet.deployment({"stable": ["hsp_stable"], "canary": [canary_member]})
    assert fleet.haproxy is not None
    set_group_weights(fleet.haproxy, deployment, {"stable": 100, "canary": 0})
    timeline: list[tuple[float, int]] = []
    start = time.monotonic()

    def event(kind: str, data: dict[str, Any]) -> None:
        if kind == "step":
            timeline.append((data["t"] - start, data["weight"]))
        elif kind == "rollback":
            timeline.append((data["t"] - start, 0))

    with LoadGenerator(fleet.url, rate=rate, workers=8) as load:
        time.sleep(1.0)  # the stable baseline
        release_start = time.monotonic()
        record = run_canary(
            deployment,
            steps=steps,
            interval_s=interval_s,
            slo=Slo(min_requests=20),
            check_every_s=1.0,
            on_event=event,
        )
        ended = time.monotonic()
        time.sleep(1.0)
    samples: list[Sample] = [s for s in load.samples if s.t >= start]
    errors = [s for s in samples if s.status >= 500 or s.status == 0]
    budget = (1 - SLO_AVAILABILITY) * max(1, len(samples))
    timeline.append((time.monotonic() - start, timeline[-1][1] if timeline else 0))
    return ScenarioResult(
        scenario=name,
        outcome=record.outcome,
        reason=record.reason,
        last_step=int(record.steps[-1]["weight"]) if record.steps else 0,
        detect_s=round(ended - release_start, 2) if record.outcome == "rolled_back" else None,
        requests=len(samples),
        new_version_requests=sum(1 for s in samples if s.server == canary_member),
        errors=len(errors),
        error_rate=round(len(errors) / max(1, len(samples)), 4),
        budget_spent_pct=round(100 * len(errors) / budget, 1),
        breach=record.breach,
        steps=record.steps,
        timeline=[(round(t, 2), w) for t, w in timeline],
        errors_at=[round(s.t - start, 2) for s in errors],
    )


def run_experiment(*, steps: list[int], interval_s: float, rate: float, folder: Path) -> list[ScenarioResult]:
    members = [
        FleetMember("hsp_stable", "stable", "stable", "1.0"),
        FleetMember("hsp_canary", "canary", "canary", "1.1"),
        FleetMember("hsp_canary_bad", "canary-bad", "canary", "1.1-bad", error_ratio=0.05),
    ]
    with ReleaseFleet(folder, members) as fleet:
        healthy = _scenario(
            fleet, "healthy release", "hsp_canary", steps=steps, interval_s=interval_s, rate=rate
        )
        bad = _scenario(
            fleet, "release with 5 % errors", "hsp_canary_bad", steps=steps, interval_s=interval_s, rate=rate
        )
    return [healthy, bad]


def table(results: list[ScenarioResult]) -> Table:
    out = Table(title="Canary releases through HAProxy, gated on the processes' metrics")
    for column in (
        "scenario",
        "outcome",
        "last step %",
        "time to detect s",
        "requests",
        "served by new version",
        "5xx",
        "error rate",
        "error budget spent (99.9 %)",
    ):
        out.add_column(column)
    for r in results:
        out.add_row(
            r.scenario,
            r.outcome,
            str(r.last_step),
            "-" if r.detect_s is None else f"{r.detect_s:.1f}",
            str(r.requests),
            str(r.new_version_requests),
            str(r.errors),
            f"{r.error_rate:.2%}",
            f"{r.budget_spent_pct:.0f} %",
        )
    return out


def conclusions(results: list[ScenarioResult]) -> list[str]:
    healthy, bad = results
    lines = [
        f"healthy release ramped to 100 %: {'held' if healthy.outcome == 'promoted' else 'did not hold'} "
        f"({healthy.outcome}; {healthy.reason})",
        "release with 5 % errors rolled back automatically: "
        f"{'held' if bad.outcome == 'rolled_back' and bad.breach else 'did not hold'} ({bad.reason}; "
        f"detected after {bad.detect_s} s; {bad.new_version_requests} of {bad.requests} requests saw it; "
        f"{bad.errors} errors, {bad.budget_spent_pct:.0f} % of this run's 99.9 % error budget)",
    ]
    return lines


def plot(results: list[ScenarioResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(12, 4), sharey=True)
    for ax, r in zip(axes, results, strict=True):
        xs = [t for t, _ in r.timeline]
        ys = [w for _, w in r.timeline]
        ax.step(xs, ys, where="post", color="tab:blue", label="canary weight %")
        ax.set_title(f"{r.scenario}: {r.outcome}")
        ax.set_xlabel("seconds")
        ax.set_ylim(-5, 105)
        twin = ax.twinx()
        twin.hist(
            r.errors_at, bins=max(1, int(max(xs or [1])) + 1), color="tab:red", alpha=0.6, label="5xx/s"
        )
        twin.set_ylabel("5xx per second")
        ax.legend(loc="upper left")
    axes[0].set_ylabel("canary weight %")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def canary_command(
    steps: Annotated[str, typer.Option(help="Canary weights in %")] = "5,20,50,100",
    interval: Annotated[float, typer.Option(min=2, max=600, help="Seconds at each step")] = 10.0,
    rate: Annotated[float, typer.Option(min=5, max=1000, help="Requests per second through HAProxy")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on stdout")] = False,
    out: OutOption = None,
    update_docs: UpdateDocsOption = False,
) -> None:
    """A healthy canary ramps to 100 %; one failing 5 % of requests is rolled back automatically."""
    console = Console(stderr=True, width=160)
    if update_docs:
        check_docs_target(NAME)
    weights = [int(s) for s in steps.split(",")]
    run = RunFolder.open(NAME, out)
    console.print(f"starting HAProxy and three `mercato api` processes; {len(weights)} steps of {interval} s")
    with tempfile.TemporaryDirectory(prefix="hsp_canary_") as tmp:
        try:
            results = run_experiment(steps=weights, interval_s=interval, rate=rate, folder=Path(tmp))
        except (RuntimeError, OSError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc
    plot(results, run.figure)
    verdict = conclusions(results)
    load = os.getloadavg()
    data = {
        "steps": weights,
        "interval_s": interval,
        "rate": rate,
        "load_average": [round(v, 2) for v in load],
        "results": [asdict(r) for r in results],
    }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        console.print(table(results))
        for line in verdict:
            console.print(f"• {line}")
        console.print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    run.record(data=data, tables=[table(results)], verdict=verdict, update_docs=update_docs, console=console)
