"""`mercato backup create|list|verify` and `mercato restore` (embedded mode: SQLite online backups).

PostgreSQL deployments back up with pgBackRest (full + incremental, WAL archived) — see
docs/runbooks/disaster-recovery.md; this command says so instead of pretending."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from mercato.config import get_settings
from mercato.kit.storage.sqlite_backup import (
    BackupError,
    create_backup,
    list_backups,
    pick,
    restore_backup,
    verify_backup,
)

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


@app.command("create")
def create() -> None:
    """Copy the live database with SQLite's online backup API into data_dir/backups, then verify."""
    database, folder = _paths()
    try:
        backup = create_backup(database, folder)
    except BackupError as exc:
        console.print(f"[red]backup failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"[green]✓[/green] {backup.path} ({backup.size_bytes} bytes, verified)")


@app.command("list")
def list_() -> None:
    """Backups, oldest first."""
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
) -> None:
    """Integrity check and migration stamp of a backup (what restore checks before touching anything)."""
    _, folder = _paths()
    try:
        backup = pick(folder, name=name)
        verify_backup(backup.path)
    except BackupError as exc:
        console.print(f"[red]not usable:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"[green]✓[/green] {backup.path.name} is intact")


def restore_command(
    latest: Annotated[bool, typer.Option("--latest", help="Restore the newest backup")] = False,
    backup: Annotated[str | None, typer.Option("--backup", help="Restore this backup (its name)")] = None,
    to_time: Annotated[
        datetime | None, typer.Option("--to-time", help="Point in time (PostgreSQL with pgBackRest only)")
    ] = None,
) -> None:
    """Put a verified backup in place of the database (stop the shop first). Nothing is overwritten
    until the backup passed verification."""
    if not (latest or backup or to_time):
        console.print("[red]say what to restore:[/red] --latest, --backup NAME or --to-time T")
        raise typer.Exit(2)
    database, folder = _paths()
    try:
        chosen = pick(folder, name=backup, to_time=to_time)
        restore_backup(chosen.path, database)
    except BackupError as exc:
        console.print(f"[red]restore refused, nothing changed:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"[green]✓[/green] {database} restored from {chosen.path.name}")
