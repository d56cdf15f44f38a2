"""`mercato api-keys create|list|revoke`: partner API keys from the command line (the same service as
`/admin/api-keys`; expects migrations applied)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mercato.bootstrap import Container
from mercato.cli._container import run_on_container
from mercato.kit.ids import parse_id
from mercato.shop.identity.api_keys import API_KEY_SCOPES, ApiKeyService

app = typer.Typer(help="Issue, list and revoke partner API keys.", no_args_is_help=True)
_out = Console()
_err = Console(stderr=True)

T = TypeVar("T")


def _run(action: Callable[[ApiKeyService], Awaitable[T]]) -> T:
    async def on(container: Container) -> T:
        assert container.api_keys is not None
        return await action(container.api_keys)

    return run_on_container(on)


@app.command("create")
def create(
    name: Annotated[str, typer.Option(help="Who or what the key is for")],
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help=f"Repeatable; any of {sorted(API_KEY_SCOPES)}")
    ] = None,
    expires_in_s: Annotated[int | None, typer.Option(help="Seconds until it stops working")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine output")] = False,
) -> None:
    """Issue a key; it is printed once (only a keyed hash is stored)."""
    issued = _run(lambda keys: keys.create(name, list(scope or []), expires_in_s=expires_in_s))
    if as_json:
        typer.echo(json.dumps({**issued.key.as_dict(), "key": issued.secret}))
        return
    _err.print(
        f"[green]✓[/green] key {issued.key.id} ({issued.key.name}); store it now, it is not shown again:"
    )
    typer.echo(issued.secret)


@app.command("list")
def list_keys(as_json: Annotated[bool, typer.Option("--json", help="Machine output")] = False) -> None:
    """Every key (never the keys themselves)."""
    keys = _run(lambda service: service.list())
    if as_json:
        typer.echo(json.dumps([key.as_dict() for key in keys]))
        return
    table = Table("id", "name", "prefix", "scopes", "created", "expires", "revoked")
    for key in keys:
        row = key.as_dict()
        table.add_row(
            row["id"],
            row["name"],
            row["prefix"],
            " ".join(row["scopes"]),
            row["created_at"],
            row["expires_at"] or "-",
            row["revoked_at"] or "-",
        )
    _out.print(table)


@app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (from `list`)")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine output")] = False,
) -> None:
    """Revoke a key: refused with 401 from now on (other processes within their cache bound)."""
    parsed = parse_id(key_id)
    if parsed is None:
        _err.print(f"[red]error:[/red] not a key id: {key_id}")
        raise typer.Exit(2)
    key = _run(lambda service: service.revoke(parsed))
    if as_json:
        typer.echo(json.dumps(key.as_dict()))
    else:
        _err.print(f"[green]✓[/green] key {key.id} revoked at {key.as_dict()['revoked_at']}")
