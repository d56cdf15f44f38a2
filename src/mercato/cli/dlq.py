"""`mercato dlq list|show|replay`: inspect and redrive dead-lettered messages.

Operates on the embedded stream's dead-letter queue in the configured database. A replayed
letter goes back to the consumer group that gave up on it (not to every group), and is marked
`replayed` once that group acknowledges it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mercato.bootstrap import build_database
from mercato.config import get_settings
from mercato.kit.messaging import DeadLetter, SqlLogStream

app = typer.Typer(help="Inspect and replay dead-lettered messages.", no_args_is_help=True)
_out = Console()
_err = Console(stderr=True)

T = TypeVar("T")


def _run(action: Callable[[SqlLogStream], Awaitable[T]]) -> T:
    async def main() -> T:
        db = build_database(get_settings())
        try:
            return await action(SqlLogStream(db))
        finally:
            await db.dispose()

    return asyncio.run(main())


def _parse(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        _err.print(f"[red]error:[/red] {value!r} is not a dead-letter id")
        raise typer.Exit(2) from exc


def _summary(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": str(letter.id),
        "group": letter.group,
        "topic": letter.topic,
        "partition": letter.partition,
        "offset": letter.offset,
        "message_id": str(letter.message.id),
        "type": letter.message.type,
        "subject": letter.message.subject,
        "attempts": letter.attempts,
        "last_error": letter.last_error,
        "status": letter.status.value,
        "dead_at": letter.dead_at.isoformat().replace("+00:00", "Z"),
        "replayed_at": letter.replayed_at.isoformat().replace("+00:00", "Z") if letter.replayed_at else None,
    }


@app.command("list")
def list_dead_letters(
    topic: Annotated[str | None, typer.Option(help="Only this topic")] = None,
    group: Annotated[str | None, typer.Option(help="Only this consumer group")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many, oldest first")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """List dead letters, oldest first."""
    letters = _run(lambda stream: stream.dead_letters(topic=topic, group=group, limit=limit))
    if as_json:
        typer.echo(json.dumps({"items": [_summary(letter) for letter in letters]}))
        return
    if not letters:
        _err.print("no dead letters")
        return
    table = Table(title=f"Dead letters ({len(letters)})")
    for column in ("id", "group", "topic", "type", "attempts", "status", "dead_at", "last_error"):
        table.add_column(column, overflow="fold")
    for letter in letters:
        row = _summary(letter)
        error = (row["last_error"] or "")[:80]
        table.add_row(
            row["id"],
            row["group"],
            row["topic"],
            row["type"],
            str(row["attempts"]),
            row["status"],
            row["dead_at"],
            error,
        )
    _out.print(table)


@app.command("show")
def show_dead_letter(
    dead_letter_id: Annotated[str, typer.Argument(metavar="ID", help="The dead letter's id")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Show one dead letter with its full CloudEvent and last error."""
    wanted = _parse(dead_letter_id)
    letter = _run(lambda stream: stream.dead_letter(wanted))
    if letter is None:
        _err.print(f"[red]error:[/red] no dead letter {wanted}")
        raise typer.Exit(1)
    detail = {**_summary(letter), "event": letter.message.to_cloudevent()}
    if as_json:
        typer.echo(json.dumps(detail))
        return
    _out.print_json(json.dumps(detail))


@app.command("replay")
def replay_dead_letters(
    ids: Annotated[list[str] | None, typer.Argument(metavar="[ID]...", help="Dead letters to replay")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter (see --topic)")] = False,
    topic: Annotated[str | None, typer.Option(help="Only dead letters of this topic")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Hand dead letters back to their consumer group for another try."""
    if bool(ids) == replay_all:
        _err.print("[red]error:[/red] give dead-letter ids or --all (not both)")
        raise typer.Exit(2)
    wanted = [_parse(value) for value in ids] if ids else None
    queued = _run(lambda stream: stream.replay_dead_letters(ids=wanted, topic=topic))
    if as_json:
        typer.echo(json.dumps({"replayed": queued}))
    else:
        _err.print(f"[green]✓[/green] {queued} dead letter(s) queued for replay")
    if wanted is not None and queued < len(wanted):
        _err.print("[red]error:[/red] some ids are unknown or already queued for replay")
        raise typer.Exit(1)
