"""`mercato backfill sealed-personal-fields`: the data step of the sealing rollout's expand/contract
(docs/runbooks/release.md section 5)."""

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

app = typer.Typer(help="Resumable, batched data backfills of schema changes.", no_args_is_help=True)
console = Console(stderr=True)


@app.command("sealed-personal-fields")
def sealed_personal_fields(
    batch: Annotated[int, typer.Option(min=1, max=100_000, help="Rows per transaction")] = 200,
    max_batches: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many batches (resume by running it again)")
    ] = None,
) -> None:
    """Seal the e-mail and display name of accounts stored in plaintext only (after migration 0027)."""

    async def action(container: Container) -> tuple[int, int]:
        total = await container.identity.unsealed()
        with Progress(
            TextColumn("seal personal fields"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("rows", total=total)
            sealed = await container.identity.seal_legacy(
                batch=batch,
                max_batches=max_batches,
                on_batch=lambda rows: progress.advance(task, rows),
            )
        return sealed, await container.identity.unsealed()

    sealed, left = run_on_container(action)
    console.print(
        f"[green]✓[/green] {sealed} account(s) sealed; {left} left" + ("" if left else " (ready to contract)")
    )
    raise typer.Exit(0)
