"""`mercato keys rotate|list`: the access-token signing keys (ADR 0036) from the command line.

Expects migrations applied. A rotation is committed to the database: the API processes sign with
the new key, and keep verifying the previous ones for their overlap, within `signing_key_reload_s`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mercato.bootstrap import Container
from mercato.cli._container import run_on_container
from mercato.shop.identity.signing_keys import KeyStatus, SigningKeyStore

app = typer.Typer(help="Rotate and list the access-token signing keys.", no_args_is_help=True)
_out = Console()
_err = Console(stderr=True)

T = TypeVar("T")


def _run(action: Callable[[SigningKeyStore], Awaitable[T]]) -> T:
    async def on(container: Container) -> T:
        assert container.signing_keys is not None
        return await action(container.signing_keys)

    return run_on_container(on)


async def _rotate(store: SigningKeyStore) -> list[KeyStatus]:
    await store.ready()  # a first key, if none exists yet, before it is retired
    await store.rotate()
    return await store.status()


@app.command("rotate")
def rotate(as_json: Annotated[bool, typer.Option("--json", help="Machine output")] = False) -> None:
    """A new key signs from now on; the previous ones verify until every token they signed expired."""
    keys = _run(_rotate)
    if as_json:
        typer.echo(json.dumps([key.as_dict() for key in keys]))
        return
    _err.print(f"[green]✓[/green] key {keys[0].kid} now signs (generation {keys[0].generation})")
    _print(keys)


@app.command("list")
def list_keys(as_json: Annotated[bool, typer.Option("--json", help="Machine output")] = False) -> None:
    """Every key, newest first, with its state (signing, verifying until …, expired); never a private half."""
    keys = _run(lambda store: store.status())
    if as_json:
        typer.echo(json.dumps([key.as_dict() for key in keys]))
        return
    _print(keys)


def _print(keys: list[KeyStatus]) -> None:
    table = Table("generation", "state", "created", "retired", "verifies until")
    table.add_column("kid", overflow="fold")  # the whole kid, as in the tokens' headers
    for key in keys:
        row = key.as_dict()
        table.add_row(
            str(key.generation),
            key.state,
            str(row["created_at"]),
            str(row["retired_at"] or "-"),
            str(row["verifies_until"] or "-"),
            key.kid,
        )
    _out.print(table)
