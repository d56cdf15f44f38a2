"""`mercato backup create|list|verify` and `mercato restore`.

Embedded mode: SQLite's online backup API into data_dir/backups. With `--cluster ROOT` (a
`mercato cluster`): pgBackRest — full or incremental backups, continuous WAL archiving, and
point-in-time restores into a scratch folder started on its own port and checked before use
(docs/runbooks/disaster-recovery.md)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from mercato.cluster.adopt import adopt_restored
from mercato.cluster.backup import BackupFailed, restore_and_start
from mercato.cluster.backup import backup as pg_backup
from mercato.cluster.backup import backups as pg_backups
from mercato.cluster.shop import shop_url, start_shop
from mercato.cluster.topology import Topology
from mercato.config import get_settings
from mercato.kit.storage.sqlite_backup import (
    BackupError,
    create_backup,
    list_backups,
    pick,
    restore_backup,
    verify_backup,
)
from mercato.lab.backup_verify import check_books, collect_books, restored_url, verify_cluster_backup

ClusterOption = Annotated[
    Path | None, typer.Option("--cluster", help="A `mercato cluster` root: use its pgBackRest repository")
]

app = typer.Typer(
    help="Back up the embedded (SQLite) database; list and verify backups.", no_args_is_help=True
)
console = Console()


def _paths() -> tuple[Path, Path]:
    settings = get_settings()
    if not settings.database.is_sqlite:
        console.print(
            "[red]this database is PostgreSQL:[/red] back it up with pgBackRest (full + incremental, "
            "continuous WAL archiving; point-in-time restore) as docs/runbooks/disaster-recovery.md shows"
        )
        raise typer.Exit(2)
    database = Path(make_url(settings.database.url).database or "")
    return database, settings.data_dir / "backups"


def _topology(root: Path) -> Topology:
    try:
        return Topology.load(root)
    except FileNotFoundError as exc:
        console.print(f"[red]no cluster at {root}[/red]")
        raise typer.Exit(1) from exc


@app.command("create")
def create(
    cluster: ClusterOption = None,
    kind: Annotated[str, typer.Option("--type", help="pgBackRest: full | diff | incr")] = "full",
) -> None:
    """Embedded: copy the live database with SQLite's online backup API, then verify. Cluster: a
    pgBackRest backup of the primary (WAL is archived continuously)."""
    if cluster is not None:
        started = time.monotonic()
        try:
            pg_backup(_topology(cluster), kind=kind)
        except (BackupFailed, ValueError) as exc:
            console.print(f"[red]backup failed:[/red] {exc}")
            raise typer.Exit(1) from exc
        console.print(f"[green]✓[/green] pgBackRest {kind} backup in {time.monotonic() - started:.1f} s")
        return
    database, folder = _paths()
    try:
        backup = create_backup(database, folder)
    except BackupError as exc:
        console.print(f"[red]backup failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"[green]✓[/green] {backup.path} ({backup.size_bytes} bytes, verified)")


@app.command("list")
def list_(cluster: ClusterOption = None) -> None:
    """Backups, oldest first."""
    if cluster is not None:
        table = Table(title=f"pgBackRest backups of {cluster}")
        for column in ("label", "type", "started", "stopped", "bytes"):
            table.add_column(column)
        for pb in pg_backups(_topology(cluster)):
            table.add_row(
                pb.label, pb.kind, pb.started.isoformat(), pb.stopped.isoformat(), str(pb.size_bytes)
            )
        console.print(table)
        return
    _, folder = _paths()
    table = Table(title=f"Backups in {folder}")
    for column in ("name", "taken at (UTC)", "bytes"):
        table.add_column(column)
    for b in list_backups(folder):
        table.add_row(b.path.name, b.taken_at.isoformat(), str(b.size_bytes))
    console.print(table)


@app.command("verify")
def verify(
    name: Annotated[str | None, typer.Argument(help="A backup's name; default the newest")] = None,
    cluster: ClusterOption = None,
    to_time: Annotated[
        datetime | None, typer.Option("--to-time", help="Cluster: check the state at this time")
    ] = None,
    database: Annotated[str, typer.Option("--database", help="Cluster: the shop's database")] = "mercato",
    keep: Annotated[bool, typer.Option("--keep", help="Cluster: keep the scratch copy's folder")] = False,
) -> None:
    """Embedded: integrity check and migration stamp of a backup. Cluster: pgBackRest's checksum
    verify, a restore into a scratch folder on a free port, and the shop's invariants checked there
    (stock conserved, completed orders paid and shipped, no capture without an order); exit 1 on any
    violation."""
    if cluster is not None:
        _verify_cluster(cluster, to_time, database, keep=keep)
        return
    _, folder = _paths()
    try:
        backup = pick(folder, name=name)
        verify_backup(backup.path)
    except BackupError as exc:
        console.print(f"[red]not usable:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"[green]✓[/green] {backup.path.name} is intact")


def _verify_cluster(root: Path, to_time: datetime | None, database: str, *, keep: bool) -> None:
    when = to_time.astimezone() if to_time is not None else None
    try:
        report = verify_cluster_backup(_topology(root), to_time=when, database=database, keep=keep)
    except BackupFailed as exc:
        console.print(f"[red]backup not usable:[/red] {exc}")
        raise typer.Exit(1) from exc
    table = Table(title=f"Shop invariants on the restored copy ({report.orders} orders)")
    for column in ("invariant", "checked", "violations", "first violation"):
        table.add_column(column)
    for v in report.verdicts:
        table.add_row(v.name, str(v.checked), str(v.violations), v.details[0] if v.details else "")
    console.print(table)
    console.print(
        f"restored {'to ' + report.to_time if report.to_time else 'the latest state'} in "
        f"{report.restore_s:.1f} s, checked in {report.check_s:.1f} s"
        + (f"; kept in {report.restored_into}" if keep else "")
    )
    if not report.ok:
        for problem in report.problems():
            console.print(f"[red]✗[/red] {problem}")
        console.print("[red]the books do not balance on this backup: do not restore it as is[/red]")
        raise typer.Exit(1)
    console.print("[green]✓[/green] repository checksums verified; the books balance on the restored copy")


def restore_command(
    cluster: ClusterOption = None,
    into: Annotated[
        Path | None, typer.Option("--into", help="Cluster: the new folder to restore into (never a live one)")
    ] = None,
    latest: Annotated[bool, typer.Option("--latest", help="Restore the newest backup")] = False,
    backup: Annotated[str | None, typer.Option("--backup", help="Restore this backup (its name)")] = None,
    to_time: Annotated[
        datetime | None, typer.Option("--to-time", help="Point in time (PostgreSQL with pgBackRest only)")
    ] = None,
    promote: Annotated[
        bool,
        typer.Option(
            "--promote",
            help="Cluster: once the shop's invariants hold on the restored copy, make it the primary",
        ),
    ] = False,
    shop_database: Annotated[
        str, typer.Option("--database", help="Cluster: the shop's database")
    ] = "mercato",
) -> None:
    """Put a verified backup in place of the database (stop the shop first). Nothing is overwritten
    until the backup passed verification."""
    if not (latest or backup or to_time):
        console.print("[red]say what to restore:[/red] --latest, --backup NAME or --to-time T")
        raise typer.Exit(2)
    if cluster is not None:
        target = into or cluster / "restored" / f"at-{int(time.time())}"
        when = to_time.astimezone() if to_time is not None else None
        try:
            scratch = restore_and_start(_topology(cluster), target, to_time=when)
        except BackupFailed as exc:
            console.print(f"[red]restore refused, nothing changed:[/red] {exc}")
            raise typer.Exit(1) from exc
        console.print(
            f"[green]✓[/green] restored into {target}, open on port {scratch.port} after "
            f"{scratch.ready_s:.1f} s"
        )
        if not promote:
            console.print(
                "check it (`mercato cluster adopt-restore` checks the shop's invariants), then put it "
                "into service: `mercato cluster adopt-restore --root … --from " + str(target) + "`"
            )
            return
        promote_restored(cluster, target, scratch.port, shop_database, restore_s=scratch.ready_s)
        return
    database, folder = _paths()
    try:
        chosen = pick(folder, name=backup, to_time=to_time)
        restore_backup(chosen.path, database)
    except BackupError as exc:
        console.print(f"[red]restore refused, nothing changed:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"[green]✓[/green] {database} restored from {chosen.path.name}")


def promote_restored(root: Path, folder: Path, port: int, database: str, *, restore_s: float = 0.0) -> None:
    """Check the shop's invariants on the restored copy open on `port`; only if they hold, make it
    the cluster's primary (`mercato.cluster.adopt`), restart the shop if it ran, take a full backup
    (the new timeline's base) and print the time to serving."""
    topology = _topology(root)
    started = time.monotonic()
    try:
        verdicts = check_books(asyncio.run(collect_books(restored_url(port, database))))
    except Exception as exc:
        console.print(f"[red]not promoted:[/red] cannot read the shop's books on port {port}: {exc}")
        raise typer.Exit(1) from exc
    broken = [f"{v.name}: {d}" for v in verdicts for d in v.details]
    if broken:
        for problem in broken:
            console.print(f"[red]✗[/red] {problem}")
        console.print("[red]not promoted:[/red] the shop's invariants do not hold on the restored copy")
        raise typer.Exit(1)
    console.print(f"[green]✓[/green] the shop's invariants hold ({len(verdicts)} checks)")
    was_serving = shop_url(topology) is not None and topology.dir("shop", "api.pid").exists()
    adopted = adopt_restored(topology, folder)
    console.print(
        f"[green]✓[/green] {folder} is the primary of scope {adopted.topology.scope!r} after "
        f"{adopted.primary_s:.1f} s; replicas re-cloned after {adopted.replicas_s:.1f} s; old data "
        f"folders kept: {', '.join(str(p) for p in adopted.moved_aside) or 'none'}"
    )
    serving = time.monotonic() - started
    if was_serving:
        url = start_shop(adopted.topology)
        serving = time.monotonic() - started
        console.print(f"[green]✓[/green] the shop answers again at {url}")
    console.print(
        f"RTO restore → serving: {restore_s + serving:.1f} s (restore {restore_s:.1f} s, checks + adopt"
        f"{' + shop start' if was_serving else ''} {serving:.1f} s)"
    )
    try:
        pg_backup(adopted.topology, kind="full")
    except BackupFailed as exc:
        console.print(f"[yellow]take a full backup now; it failed here:[/yellow] {exc}")
        return
    console.print("[green]✓[/green] full backup of the new timeline taken")
