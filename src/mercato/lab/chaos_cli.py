"""`mercato lab chaos`: the checkout chaos run from the command line, with a table of its verdicts."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mercato.bench.harness import OutOption, RunFolder
from mercato.lab.chaos import ChaosConfig, ChaosReport, run_chaos

__all__ = ["chaos_command"]

_console = Console(stderr=True)


def _table(report: ChaosReport) -> Table:
    table = Table(
        title=f"Checkout chaos on {report.backend}: {report.checkouts} checkouts, "
        f"{report.kills} worker kills, {report.duration_s:.0f} s"
    )
    for column in ("invariant", "verdict", "checked", "violations", "first violation"):
        table.add_column(column)
    for verdict in report.verdicts:
        table.add_row(
            verdict.name,
            "[green]holds[/green]" if verdict.ok else "[red]VIOLATED[/red]",
            str(verdict.checked),
            str(verdict.violations),
            verdict.details[0] if verdict.details else "",
        )
    if not report.settled:
        table.add_row("settled", "[red]NO[/red]", "", "", "sagas or outbox rows left after the bound")
    return table


def _counts_table(report: ChaosReport) -> Table:
    table = Table(title="Counts")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, value in report.counts.items():
        table.add_row(name, str(value))
    return table


def verdict_lines(report: ChaosReport) -> list[str]:
    """One line per invariant, and whether the run settled within its bound."""
    lines = [
        f"{v.name}: {'holds' if v.ok else 'VIOLATED'} ({v.checked} checked, {v.violations} violations)"
        for v in report.verdicts
    ]
    lines.append(f"settled within the bound: {'yes' if report.settled else 'NO'}")
    return lines


def chaos_command(
    checkouts: Annotated[int, typer.Option(min=1, help="How many checkouts to drive")] = 1000,
    kills: Annotated[int, typer.Option(min=0, help="How many times to SIGKILL and restart the worker")] = 10,
    backend: Annotated[
        str, typer.Option(help="sqlite | postgresql (a fresh database, dropped after)")
    ] = "sqlite",
    database_url: Annotated[
        str | None,
        typer.Option(
            help="A PostgreSQL server URL (a fresh database is made on it) or a new SQLite file's URL"
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Customers checking out at once")] = 16,
    drive_s: Annotated[float, typer.Option(help="Spread checkout arrivals over at least this long")] = 60.0,
    saga_deadline_s: Annotated[
        float, typer.Option(help="MERCATO_CHECKOUT_SAGA_DEADLINE_S of the run")
    ] = 60.0,
    seed: Annotated[int, typer.Option(help="Seed for the faults, the kills and the carts")] = 11,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout")] = False,
    out: OutOption = None,
) -> None:
    """Checkouts under PSP faults (30 % errors, 10 % hangs, 5 % lost answers), carrier faults (10 %)
    and worker SIGKILLs; then check every order, payment, shipment, unit of stock and event."""
    if backend not in ("sqlite", "postgresql"):
        raise typer.BadParameter("backend must be sqlite or postgresql")
    config = ChaosConfig(
        checkouts=checkouts,
        kills=kills,
        backend=backend,
        database_url=database_url,
        concurrency=concurrency,
        # Enough stock for most, not all: some orders are cancelled for want of it.
        stock_per_sku=max(5, checkouts * 3 // 10),
        drive_s=drive_s,
        saga_deadline_s=saga_deadline_s,
        kill_gap_s=(max(0.5, drive_s / max(kills, 1) * 0.5), max(1.0, drive_s / max(kills, 1) * 1.3)),
        seed=seed,
    )
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_console,
    )
    with progress:
        task = progress.add_task("checkouts", total=checkouts)
        report = asyncio.run(
            run_chaos(config, log=progress.console.log, on_checkout=lambda: progress.advance(task))
        )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _console.print(_table(report))
        _console.print(_counts_table(report))
    RunFolder.open("chaos", out).record(
        data=report.to_dict(),
        tables=[_table(report), _counts_table(report)],
        verdict=verdict_lines(report),
        console=_console,
    )
    if not report.ok:
        _console.print(f"[red]invariants broken[/red]; logs and databases kept in {report.workdir}")
        raise typer.Exit(1)
