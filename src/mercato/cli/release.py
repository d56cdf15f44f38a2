"""`mercato release init | canary | blue-green | history`: move traffic between groups of API processes
behind HAProxy (its runtime API), gated on the processes' own metrics (cluster/release.py, ADR 0047)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mercato.cluster.release import Deployment, Member, Slo, run_canary, switch_blue_green

app = typer.Typer(help="Canary and blue/green releases behind HAProxy.", no_args_is_help=True)
console = Console(stderr=True)

StateOption = Annotated[
    Path,
    typer.Option("--state", file_okay=False, help="The deployment's folder (release.json, releases.jsonl)"),
]


def _load(state: Path) -> Deployment:
    try:
        return Deployment.load(state)
    except (OSError, ValueError, KeyError) as exc:
        console.print(f"[red]error:[/red] no deployment in {state} ({exc}); run `mercato release init`")
        raise typer.Exit(2) from exc


def _members(spec: str) -> tuple[str, list[Member]]:
    group, _, rest = spec.partition("=")
    members = []
    for item in filter(None, rest.split(",")):
        name, _, url = item.partition("@")
        if not name or not url.startswith("http"):
            raise typer.BadParameter(f"{item!r}: expected server_name@http://host:port")
        members.append(Member(name, url.rstrip("/")))
    if not group or not members:
        raise typer.BadParameter(f"{spec!r}: expected group=server@url[,server@url...]")
    return group, members


@app.command("init")
def init(
    state: StateOption,
    runtime_port: Annotated[int, typer.Option(help="HAProxy's runtime API (stats socket) TCP port")],
    group: Annotated[list[str], typer.Option(help="group=server@url[,server@url] (repeat per group)")],
    live: Annotated[str, typer.Option(help="The group serving now")] = "stable",
) -> None:
    """Describe a deployment: HAProxy's runtime port and the server groups of its `api` backend."""
    groups = dict(_members(spec) for spec in group)
    if live not in groups:
        raise typer.BadParameter(f"--live {live!r} is not among the groups {sorted(groups)}")
    Deployment(runtime_port, groups, state, live).save()
    console.print(f"[green]✓[/green] deployment written to {state}/release.json")


def _print_record(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(record, default=str))
        return
    colour = "green" if record["outcome"] in ("promoted", "switched") else "red"
    console.print(f"[{colour}]{record['outcome']}[/{colour}]: {record['reason']}")


@app.command("canary")
def canary(
    state: StateOption,
    steps: Annotated[str, typer.Option(help="Canary weights in %, in order")] = "5,20,50,100",
    interval: Annotated[float, typer.Option(min=1, help="Seconds observed at each step")] = 60.0,
    stable: Annotated[str, typer.Option(help="The stable group")] = "stable",
    group: Annotated[str, typer.Option("--canary", help="The canary group")] = "canary",
    max_error_rate_delta: Annotated[float, typer.Option(min=0, max=1)] = 0.01,
    max_p99_ratio: Annotated[float, typer.Option(min=1)] = 2.0,
    p99_slack_s: Annotated[float, typer.Option(min=0)] = 0.1,
    min_requests: Annotated[int, typer.Option(min=1)] = 30,
    min_latency_requests: Annotated[int, typer.Option(min=1)] = 100,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ramp the canary through the steps; roll back at once (weight 0) when it breaks the SLO."""
    try:
        weights = [int(s) for s in steps.split(",")]
    except ValueError as exc:
        raise typer.BadParameter("--steps: comma-separated integers") from exc
    if not weights or weights != sorted(weights) or not all(0 < w <= 100 for w in weights):
        raise typer.BadParameter("--steps: increasing percentages in 1..100")
    deployment = _load(state)
    slo = Slo(max_error_rate_delta, max_p99_ratio, p99_slack_s, min_requests, min_latency_requests)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console, transient=as_json
    ) as progress:
        task = progress.add_task("canary", total=len(weights))

        def event(kind: str, data: dict[str, Any]) -> None:
            if kind == "step":
                progress.update(task, description=f"canary at {data['weight']} %")
            elif kind == "check":
                progress.update(task, description=f"canary at {data['weight']} %: {data['reason']}")
                if data["verdict"] == "pass":
                    progress.update(task, completed=weights.index(data["weight"]) + 0.5)

        record = run_canary(
            deployment,
            steps=weights,
            interval_s=interval,
            slo=slo,
            stable=stable,
            canary=group,
            on_event=event,
        )
    _print_record(asdict(record), as_json)
    raise typer.Exit(0 if record.outcome == "promoted" else 1)


@app.command("blue-green")
def blue_green(
    state: StateOption,
    to: Annotated[str, typer.Option(help="The group to send all traffic to (the other one to switch back)")],
    smoke: Annotated[list[str] | None, typer.Option(help="Smoke paths that must answer 200")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """All traffic to one group after its readiness and smoke checks pass; nothing moves otherwise."""
    deployment = _load(state)
    paths = tuple(smoke) if smoke else ("/healthz", "/v1/products?limit=1")
    try:
        record = switch_blue_green(deployment, to=to, smoke_paths=paths)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    _print_record(asdict(record), as_json)
    raise typer.Exit(0 if record.outcome == "switched" else 1)


@app.command("history")
def history(state: StateOption, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The deployment's release records, oldest first."""
    records = _load(state).records()
    if as_json:
        typer.echo(json.dumps(records))
        return
    table = Table("id", "kind", "started", "outcome", "reason")
    for r in records:
        table.add_row(r["id"], r["kind"], r["started_at"][:19], r["outcome"], r["reason"])
    Console().print(table)
