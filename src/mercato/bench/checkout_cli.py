"""``mercato bench checkout``: the command (registered on the ``bench`` sub-app in `mercato.bench.cli`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from mercato.bench.checkout import MODES, CheckoutBenchOptions, CheckoutBenchReport, run_checkout_bench
from mercato.bench.checkout_report import LOAD_GENERATOR, MACHINE, POSTGRESQL, CheckoutStep, rate_ladder
from mercato.bench.harness import OutOption, RunFolder
from mercato.bench.servers import server_settings

console = Console(stderr=True)


def parse_rates(value: str | None) -> tuple[float, ...]:
    if not value:
        return rate_ladder()
    try:
        return rate_ladder(float(item) for item in value.split(",") if item.strip())
    except ValueError as exc:
        raise typer.BadParameter(
            f"rates are comma-separated positive numbers, e.g. 25,50,100 ({exc})"
        ) from exc


def _ms(value: float) -> str:
    return f"{value:,.1f}"


def steps_table(report: CheckoutBenchReport) -> Table:
    table = Table(title=f"Checkouts, {report.database}, {report.options.mode} (latencies in ms)")
    columns = (
        "offered/s",
        "accepted/s",
        "completed/s",
        "errors",
        "POST p50",
        "POST p99",
        "accept p50",
        "accept p95",
        "accept p99",
        "bare p50",
        "bare p99",
        "accept÷bare p50",
        "done p50",
        "done p95",
        "done p99",
    )
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for step in report.steps:
        d = step.to_dict()
        base = d["baseline"] or {}
        share = d["accept_p50_vs_bare_p50"]
        table.add_row(
            f"{step.offered_rate:g}",
            f"{step.accepted_rate:.1f}",
            f"{step.completed_rate:.1f}",
            str(step.counts.errors + step.completion.compensated + step.completion.failed),
            _ms(d["post"]["p50_ms"]),
            _ms(d["post"]["p99_ms"]),
            _ms(d["accept"]["p50_ms"]),
            _ms(d["accept"]["p95_ms"]),
            _ms(d["accept"]["p99_ms"]),
            _ms(base.get("p50_ms", 0.0)),
            _ms(base.get("p99_ms", 0.0)),
            "—" if share is None else f"{share:.0f}×",
            _ms(d["completion"]["p50_ms"]),
            _ms(d["completion"]["p95_ms"]),
            _ms(d["completion"]["p99_ms"]),
        )
    return table


def round_trips_table(step: CheckoutStep) -> Table:
    table = Table(title=f"DB statements per completed checkout at {step.offered_rate:g}/s")
    for column in ("phase", "statements", "transactions"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    stmts = step.round_trips_per_checkout()
    txs = step.to_dict()["transactions_per_checkout"]
    for phase, value in stmts.items():
        table.add_row(phase, f"{value:.2f}", f"{txs.get(phase, 0.0):.2f}")
    table.add_row("[bold]total[/bold]", f"{sum(stmts.values()):.2f}", f"{sum(txs.values()):.2f}")
    return table


def cpu_table(report: CheckoutBenchReport) -> Table:
    """CPU ms per completed checkout at each rate: each server, PostgreSQL, the load generator, and
    the system (the machine less the load generator)."""
    table = Table(title="CPU ms per completed checkout")
    table.add_column("offered/s", justify="right")
    names = [k for k in report.steps[0].server_cpu_s if k not in (MACHINE, POSTGRESQL, LOAD_GENERATOR)]
    columns = [*names, POSTGRESQL, LOAD_GENERATOR, "system", MACHINE, "new PG sessions/s"]
    for column in columns:
        table.add_column(f"[bold]{column}[/bold]" if column == "system" else column, justify="right")
    for step in report.steps:
        done = step.completion.completed
        if not done:
            continue
        figures = {k: v * 1000 / done for k, v in step.server_cpu_s.items()}
        system = step.system_cpu_s
        figures["system"] = system * 1000 / done if system is not None else float("nan")
        # Not per checkout: a pool that churns its connections (each a backend fork, type
        # introspection and every statement prepared again) shows here.
        figures["new PG sessions/s"] = (
            step.new_sessions_per_s if step.new_sessions_per_s is not None else float("nan")
        )
        table.add_row(f"{step.offered_rate:g}", *(f"{figures.get(c, float('nan')):.1f}" for c in columns))
    return table


def _check_vs(vs: str, database_url: str | None) -> None:
    """Before anything runs: a known engine, PostgreSQL, and the extra installed."""
    from mercato.bench.dbos_checkout import DbosMissing, dbos_database_url, require_dbos

    if vs != "dbos":
        raise typer.BadParameter("--vs is dbos (the only engine compared so far)")
    try:
        dbos_database_url(database_url)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        require_dbos()
    except DbosMissing as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc


def _run_vs(
    options: CheckoutBenchOptions, report: CheckoutBenchReport, data: dict[str, object], folder: RunFolder
) -> tuple[Table, list[str]]:
    """The DBOS side at the same rates; its table, the verdict lines and the PNG."""
    from mercato.bench import dbos_checkout as vs

    plan = vs.DbosPlan(
        rates=options.rates,
        duration_s=options.duration_s,
        warmup_s=options.warmup_s,
        drain_s=options.drain_s,
        stop_when_saturated=options.stop_when_saturated,
        skus=options.products,
    )
    with console.status("DBOS side: the same rates"):
        try:
            dbos = vs.run_dbos_side(plan, options.database_url)
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
            console.print(f"[red]DBOS side failed:[/red] {exc}")
            raise typer.Exit(1) from exc
    rows = vs.comparison_rows(report.steps, dbos)
    vs.plot(rows, folder.figure)
    lines = vs.verdict(rows)
    data["vs_dbos"] = {"dbos": dbos, "rows": rows, "beyond_six_steps": vs.BEYOND, "verdict": lines}
    return vs.comparison_table(rows), lines


def checkout(
    rates: Annotated[str | None, typer.Option(help="Arrival rates (checkouts/s), e.g. 25,50,100,200")] = None,
    duration: Annotated[float, typer.Option(help="Seconds per fixed-rate step", min=0.5)] = 5.0,
    warmup: Annotated[
        float, typer.Option(help="Warm-up seconds at the first rate (not reported)", min=0)
    ] = 2.0,
    drain: Annotated[float, typer.Option(help="Longest wait for a step's sagas to finish (s)", min=1)] = 30.0,
    mode: Annotated[str, typer.Option(help="distributed (api + worker + providers) or embedded (up)")] = (
        "distributed"
    ),
    database_url: Annotated[
        str | None,
        typer.Option(help="Benchmark on this database (e.g. PostgreSQL) instead of a temporary SQLite file"),
    ] = None,
    create_database: Annotated[
        bool,
        typer.Option(help="Create the --database-url database first and drop it afterwards (PostgreSQL)"),
    ] = False,
    customers: Annotated[
        int, typer.Option(help="Customer accounts to rotate through", min=1, max=1000)
    ] = 400,
    timeout: Annotated[float, typer.Option(help="Per-checkout timeout from its intended time (s)")] = 5.0,
    keep_going: Annotated[
        bool, typer.Option(help="Run every rate even after one completes < 50% of its offered rate")
    ] = False,
    profile_dir: Annotated[
        Path | None,
        typer.Option(help="py-spy (raw format) the Mercato and provider processes during the last step"),
    ] = None,
    vs: Annotated[
        str | None,
        typer.Option(
            help="Also run the same six steps on another engine, side by side: dbos (the bench extra)"
        ),
    ] = None,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            "--setting",
            help="A MERCATO_* setting for the Mercato processes, NAME=VALUE (repeatable), e.g. "
            "MERCATO_WORKER_SIDE_JOB_WINDOW_S=0.25",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout")] = False,
    out: OutOption = None,
) -> None:
    """Completed checkouts/s and p50/p99 at fixed arrival rates, with the bare baseline side by side."""
    if mode not in MODES:
        raise typer.BadParameter(f"--mode is one of {', '.join(MODES)}")
    try:
        settings = server_settings(setting)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--setting") from exc
    if vs is not None:
        _check_vs(vs, database_url)
    options = CheckoutBenchOptions(
        rates=parse_rates(rates),
        duration_s=duration,
        warmup_s=warmup,
        drain_s=drain,
        mode=mode,
        database_url=database_url,
        create_database=create_database,
        customers=customers,
        products=max(400, customers),
        timeout_s=timeout,
        stop_when_saturated=not keep_going,
        profile_dir=profile_dir,
        settings=settings,
    )
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    )
    task = progress.add_task("preparing", total=None)

    def on_phase(message: str) -> None:
        progress.update(task, description=message)

    def on_step(step: CheckoutStep) -> None:
        d = step.to_dict()
        progress.console.print(
            f"  {step.offered_rate:>6g}/s  accepted {step.accepted_rate:7.1f}/s  completed "
            f"{step.completed_rate:7.1f}/s  POST p99 {d['post']['p99_ms']:8.1f} ms  done p99 "
            f"{d['completion']['p99_ms']:8.1f} ms  errors {step.counts.errors}"
            + ("  [red]saturated[/red]" if step.saturated else "")
        )

    try:
        with progress:
            report = run_checkout_bench(options, on_phase=on_phase, on_step=on_step)
    except (RuntimeError, OSError, ValueError) as exc:
        console.print(f"[red]benchmark failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    tables = [steps_table(report)]
    if report.steps:
        tables += [cpu_table(report), round_trips_table(report.steps[-1])]
    data = report.to_dict()
    folder = RunFolder.open("bench-checkout", out)
    lines: list[str] = []
    if vs is not None:
        vs_table, lines = _run_vs(options, report, data, folder)
        tables.append(vs_table)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        screen = Console(width=max(Console().width, 180))
        for table in tables:
            screen.print(table)
        for line in lines:
            screen.print(line, soft_wrap=True)
    folder.record(data=data, tables=tables, verdict=lines, console=console)
    if not report.steps or any(s.counts.errors or s.completion.unknown for s in report.steps):
        raise typer.Exit(1)
