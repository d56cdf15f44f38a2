"""`mercato lab failover`: the Patroni/NATS failover drill from the command line (see failover.py)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mercato.bench.harness import OutOption, RunFolder
from mercato.lab.failover import FailoverConfig, report_rows, run_failover
from mercato.lab.restore import report_rows as restore_rows
from mercato.lab.restore import run_restore_drill

__all__ = ["failover_command", "restore_command"]

_console = Console(stderr=True)


def _stop_on_sigterm() -> None:
    """SIGTERM (a `timeout`, a CI cancel) unwinds like Ctrl-C, so the drill's `finally` stops the
    cluster it started instead of leaving etcd, Patroni and PostgreSQL running."""

    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def failover_command(
    checkouts: Annotated[int, typer.Option(min=1, help="Checkouts driven through the API")] = 60,
    kill_after: Annotated[
        int, typer.Option(min=1, help="SIGKILL the primary after this many checkouts")
    ] = 10,
    synchronous: Annotated[
        bool, typer.Option("--synchronous/--asynchronous", help="Patroni synchronous_mode")
    ] = True,
    drive_s: Annotated[float, typer.Option(help="Spread checkout arrivals over this long")] = 25.0,
    nats: Annotated[bool, typer.Option("--nats/--no-nats", help="Also kill a NATS node under load")] = True,
    kill: Annotated[
        str, typer.Option("--kill", help="postgres: the primary's postmaster; patroni: its Patroni only")
    ] = "postgres",
    patroni_down_s: Annotated[
        float, typer.Option(min=0.0, help="--kill patroni: restart Patroni (as systemd would) after this")
    ] = 20.0,
    fence: Annotated[
        bool,
        typer.Option(
            "--fence/--no-fence", help="--kill patroni: its PostgreSQL dies with it (KillMode=control-group)"
        ),
    ] = False,
    out: OutOption = None,
) -> None:
    """SIGKILL the primary's PostgreSQL under checkout load: Patroni promotes; measure RTO, RPO,
    checkouts lost, double captures; the old primary rejoins. Then kill a NATS node: 0 lost."""
    _stop_on_sigterm()
    if kill not in ("postgres", "patroni"):
        raise typer.BadParameter("postgres or patroni", param_hint="--kill")
    config = FailoverConfig(
        kill=kill,
        patroni_down_s=patroni_down_s,
        fence=fence,
        checkouts=checkouts,
        kill_after_checkouts=min(kill_after, checkouts),
        synchronous=synchronous,
        drive_s=drive_s,
        nats=nats,
        out=RunFolder.open("failover", out).path,
    )
    report, folder = asyncio.run(run_failover(config, log=_console.log))
    table = Table(title=f"Failover drill: {'PASS' if report.ok else 'FAIL'} (run folder {folder})")
    for column in ("measure", "value", "goal"):
        table.add_column(column)
    rows = report_rows(report)
    for row in rows:
        table.add_row(*row)
    _console.print(table)
    RunFolder("failover", Path(folder)).write_result(
        held=report.ok, verdict=[f"{m}: {v} (goal {g})" for m, v, g in rows]
    )
    if not report.ok:
        raise typer.Exit(1)


def restore_command(
    rows: Annotated[int, typer.Option(min=10, help="Rows committed around T")] = 300,
    out: OutOption = None,
) -> None:
    """pgBackRest drill: full + incr backups, note T, keep writing, destroy every node's data,
    restore to T → exactly the rows before T; then bad inputs are refused."""
    _stop_on_sigterm()
    folder = RunFolder.open("restore", out).path
    report = asyncio.run(run_restore_drill(rows=rows, out=folder))
    table = Table(title=f"Restore drill: {'PASS' if report.ok else 'FAIL'} (run folder {folder})")
    for column in ("measure", "value", "goal"):
        table.add_column(column)
    measured = restore_rows(report)
    for row in measured:
        table.add_row(*row)
    _console.print(table)
    RunFolder("restore", folder).write_result(
        held=report.ok, verdict=[f"{m}: {v} (goal {g})" for m, v, g in measured]
    )
    if not report.ok:
        raise typer.Exit(1)
