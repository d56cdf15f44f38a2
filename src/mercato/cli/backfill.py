"""`mercato backfill public-names`: the expand/contract rename's data step (docs/runbooks/release.md)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mercato.bootstrap import Container
from mercato.cli._container import run_on_container
from mercato.shop.identity.backfill import backfill_public_names, missing_public_names

app = typer.Typer(help="Resumable, batched data backfills of schema changes.", no_args_is_help=True)
console = Console(stderr=True)


@app.command("public-names")
def public_names(
    batch: Annotated[int, typer.Option(min=1, max=100_000, help="Rows per transaction")] = 500,
    max_batches: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many batches (resume by running it again)")
    ] = None,
) -> None:
    """Copy identity_users.display_name into public_name where it is missing (after migration 0022)."""

    async def action(container: Container) -> tuple[int, int]:
        total = await missing_public_names(container.db)
        with Progress(
            TextColumn("backfill public_name"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("rows", total=total)
            filled = await backfill_public_names(
                container.db,
                batch=batch,
                max_batches=max_batches,
                on_batch=lambda rows: progress.advance(task, rows),
            )
        return filled, await missing_public_names(container.db)

    filled, left = run_on_container(action)
    console.print(
        f"[green]✓[/green] {filled} row(s) filled; {left} left" + ("" if left else " (ready to contract)")
    )
    raise typer.Exit(0)
