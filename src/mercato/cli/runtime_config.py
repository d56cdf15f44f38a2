"""`mercato config set | diff | history | rollback | processes`: the versioned runtime configuration
(ADR 0045). `show` (in main.py) prints the start-up settings; these manage what changes at run time."""

from __future__ import annotations

import difflib
import getpass
import json
import socket
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mercato.bootstrap import Container
from mercato.cli._container import run_on_container
from mercato.kit.dynconfig import ConfigConflict, ConfigInvalid, ConfigStore, ConfigVersion

__all__ = ["register"]

console = Console()
err = Console(stderr=True)


def _store(container: Container) -> ConfigStore:
    assert container.runtime is not None
    return container.runtime.store


def _author(given: str | None) -> str:
    if given:
        return given
    try:
        user = getpass.getuser()
    except OSError:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _read_document(path: str) -> dict[str, Any]:
    raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    try:
        if path.endswith(".toml"):
            return tomllib.loads(raw.decode())
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        err.print(
            f"[red]error:[/red] {path} is not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {exc}"
        )
        raise typer.Exit(2) from exc
    if not isinstance(parsed, dict):
        err.print("[red]error:[/red] the document must be an object")
        raise typer.Exit(2)
    return parsed


def _lines(document: dict[str, Any]) -> list[str]:
    return json.dumps(document, indent=2, sort_keys=True).splitlines()


def _refused(exc: ConfigInvalid) -> typer.Exit:
    err.print("[red]refused:[/red] the document is invalid; nothing was stored")
    for problem in exc.errors:
        err.print(f"  - {problem}")
    return typer.Exit(2)


def _stored(version: ConfigVersion, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"version": version.version, "checksum": version.checksum}))
    else:
        console.print(
            f"[green]✓[/green] version {version.version} stored by {version.author} "
            f"({version.action}); every process applies it within its poll interval"
        )


def register(app: typer.Typer) -> None:
    @app.command("set")
    def config_set(
        path: Annotated[str, typer.Argument(help="A JSON or TOML document ('-': JSON on stdin)")],
        author: Annotated[str | None, typer.Option(help="Who (default: user@host)")] = None,
        comment: Annotated[str, typer.Option(help="Why")] = "",
        base: Annotated[
            int | None, typer.Option(help="Refuse unless this is still the latest version (compare-and-set)")
        ] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and diff only")] = False,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Validate a runtime-configuration document and store it as the next version."""
        document = _read_document(path)

        async def action(container: Container) -> ConfigVersion | None:
            store = _store(container)
            store.check(document)
            if dry_run:
                latest = await store.latest()
                for line in difflib.unified_diff(
                    _lines(latest.document if latest else {}), _lines(document), "latest", path, lineterm=""
                ):
                    typer.echo(line)
                return None
            return await store.put(document, author=_author(author), comment=comment, expected_version=base)

        try:
            stored = run_on_container(action)
        except ConfigInvalid as exc:
            raise _refused(exc) from exc
        except ConfigConflict as exc:
            err.print(f"[red]conflict:[/red] {exc}")
            raise typer.Exit(3) from exc
        if stored is not None:
            _stored(stored, as_json)

    @app.command("diff")
    def config_diff(
        a: Annotated[int | None, typer.Argument(help="Version (default: the one before the latest)")] = None,
        b: Annotated[int | None, typer.Argument(help="Version (default: the latest)")] = None,
    ) -> None:
        """Unified diff between two stored versions (0 is the empty document)."""

        async def action(container: Container) -> list[str]:
            store = _store(container)
            latest = await store.latest_version()
            left, right = (latest - 1 if a is None else a), (latest if b is None else b)
            docs = []
            for number in (left, right):
                found = await store.get(number) if number > 0 else None
                if number > 0 and found is None:
                    raise ConfigInvalid([f"version {number} does not exist"])
                docs.append(found.document if found else {})
            return list(
                difflib.unified_diff(
                    _lines(docs[0]), _lines(docs[1]), f"version {left}", f"version {right}", lineterm=""
                )
            )

        try:
            lines = run_on_container(action)
        except ConfigInvalid as exc:
            raise _refused(exc) from exc
        for line in lines:
            typer.echo(line)

    @app.command("history")
    def config_history(
        limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Who changed the runtime configuration, when and why (newest first)."""

        async def action(container: Container) -> list[ConfigVersion]:
            return await _store(container).history(limit=limit)

        versions = run_on_container(action)
        if as_json:
            typer.echo(
                json.dumps(
                    [
                        {
                            "version": v.version,
                            "author": v.author,
                            "action": v.action,
                            "comment": v.comment,
                            "created_at": v.created_at.isoformat(),
                            "checksum": v.checksum,
                            "sections": sorted(v.document),
                        }
                        for v in versions
                    ]
                )
            )
            return
        table = Table("version", "when (UTC)", "author", "action", "sections", "comment")
        for v in versions:
            table.add_row(
                str(v.version),
                v.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                v.author,
                v.action,
                ", ".join(sorted(v.document)) or "(empty)",
                v.comment,
            )
        console.print(table)

    @app.command("rollback")
    def config_rollback(
        to: Annotated[int | None, typer.Option(help="Version to restore (default: the previous one)")] = None,
        author: Annotated[str | None, typer.Option(help="Who (default: user@host)")] = None,
        comment: Annotated[str, typer.Option(help="Why")] = "",
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Store an earlier version's document again, as a new version."""

        async def action(container: Container) -> ConfigVersion:
            return await _store(container).rollback(to_version=to, author=_author(author), comment=comment)

        try:
            stored = run_on_container(action)
        except ConfigInvalid as exc:
            raise _refused(exc) from exc
        _stored(stored, as_json)

    @app.command("processes")
    def config_processes(
        within: Annotated[float, typer.Option(help="Seen within this many seconds")] = 30.0,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """The running processes: role, code release, runtime-configuration version, and the schema
        parts they still need (a contract migration waits for those to be gone)."""

        async def action(container: Container) -> tuple[int, list[Any]]:
            store = _store(container)
            return await store.latest_version(), await store.processes(seen_within_s=within)

        latest, reports = run_on_container(action)
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "latest": latest,
                        "processes": [
                            {
                                "process_id": r.process_id,
                                "role": r.role,
                                "app_version": r.app_version,
                                "config_version": r.config_version,
                                "needs": list(r.needs),
                                "seen_at": r.seen_at.isoformat(),
                            }
                            for r in reports
                        ],
                    }
                )
            )
            return
        table = Table("process", "role", "release", "config", "needs", "last seen (UTC)")
        for r in reports:
            mark = "" if r.config_version == latest else " [yellow](behind)[/yellow]"
            table.add_row(
                r.process_id,
                r.role,
                r.app_version,
                f"{r.config_version}{mark}",
                ", ".join(r.needs),
                r.seen_at.strftime("%H:%M:%S"),
            )
        console.print(table)
        console.print(f"latest version: {latest}")
