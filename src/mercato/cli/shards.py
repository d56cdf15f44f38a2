"""`mercato shards status|add|rebalance|pin|prepare`: the chat message shards (ADR 0043).

`add URL` adds a PostgreSQL database as a shard and moves, online, the rooms whose owner changes
(copy -> dual-write -> verify -> switch -> clean up) while the API keeps writing. `rebalance` resumes
an interrupted move; `pin ROOM SHARD` gives a hot room a shard of its own (the directory override).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mercato.bootstrap import build_chat_shards, build_database
from mercato.config import Settings, get_settings
from mercato.kit.clock import SystemClock
from mercato.kit.errors import DomainError
from mercato.shop.chat.rebalance import ChatRebalancer, RebalanceReport, shard_status
from mercato.shop.chat.shards import ChatShards

__all__ = ["app", "prepare_shards"]

app = typer.Typer(
    help="Chat message shards: status, add a shard online, resume a rebalance.", no_args_is_help=True
)
_out = Console()
_err = Console(stderr=True)
T = TypeVar("T")
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


def _run(action: Callable[[ChatShards], Awaitable[T]], settings: Settings | None = None) -> T:
    async def main() -> T:
        chosen = settings or get_settings()
        db = build_database(chosen)
        shards = build_chat_shards(chosen, db, _clock(), None)
        try:
            return await action(shards)
        finally:
            await shards.close()
            await db.dispose()

    try:
        return asyncio.run(main())
    except DomainError as exc:
        _err.print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(1) from exc


def _clock() -> SystemClock:
    return SystemClock()


def prepare_shards(settings: Settings) -> list[str]:
    """Tables on every configured shard besides the main database (run by `mercato migrate`)."""
    if not [u for u in settings.chat.shard_urls if u != "main"]:
        return []
    return _run(lambda shards: ChatRebalancer(shards).prepare(), settings)


def _print_status(status: dict[str, Any]) -> None:
    table = Table(title=f"chat shards, map epoch {status['epoch']} ({status['algorithm']})")
    for column in ("shard", "role", "messages", "rooms", "fences", "url"):
        table.add_column(column, justify="right" if column in {"messages", "rooms", "fences"} else "left")
    for s in status["shards"]:
        table.add_row(s["shard"], s["role"], str(s["messages"]), str(s["rooms"]), str(s["fences"]), s["url"])
    _out.print(table)
    moving = status["rebalancing_to"]
    _out.print(
        f"skew (max/mean messages): {status['skew']}" + (f"; rebalancing to {moving}" if moving else "")
    )


@app.command()
def status(as_json: JsonOption = False) -> None:
    """The shard map and each shard's messages, rooms and fences, with the skew."""
    found = _run(shard_status)
    if as_json:
        print(json.dumps(found, indent=2))
    else:
        _print_status(found)


def _with_progress(action: Callable[[ChatRebalancer], Awaitable[RebalanceReport]], as_json: bool) -> None:
    async def go(shards: ChatShards) -> RebalanceReport:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=_err,
            disable=as_json,
        ) as progress:
            tasks: dict[str, Any] = {}

            def tell(step: str, done: int, total: int) -> None:
                if step not in tasks:
                    tasks[step] = progress.add_task(step, total=total)
                progress.update(tasks[step], completed=done, total=total)

            return await action(ChatRebalancer(shards, progress=tell))

    report = _run(go)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _out.print(
            f"moved {report.moved_rooms} rooms ({report.moved_messages} messages) "
            f"in {report.duration_s:.2f} s, "
            f"{report.rounds} round(s); cleaned {report.cleaned_messages}; map epoch {report.epoch}"
        )


@app.command()
def add(
    url: Annotated[str, typer.Argument(help="The new shard's database URL (postgresql+asyncpg://...)")],
    name: Annotated[str | None, typer.Option(help="Its name (default s<N>)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Add a shard and move the rooms that change owner to it, online."""
    _with_progress(lambda r: r.add_shard(url, name=name), as_json)


@app.command()
def rebalance(as_json: JsonOption = False) -> None:
    """Finish a pending rebalance (after an interrupted `add` or `pin`); nothing to do is success."""
    _with_progress(lambda r: r.run(), as_json)


@app.command()
def pin(
    room: Annotated[uuid.UUID, typer.Argument(help="The hot room's id")],
    shard: Annotated[str, typer.Argument(help="The shard to put it on")],
    as_json: JsonOption = False,
) -> None:
    """Pin a hot room to a shard (directory override) and move it there online."""
    _with_progress(lambda r: r.pin(room, shard), as_json)


@app.command()
def prepare() -> None:
    """Create the chat tables on every shard other than the main database."""
    _out.print(f"prepared: {', '.join(prepare_shards(get_settings())) or 'nothing (one shard)'}")
