"""`mercato schemas check|list|show|register`: the integration-event schemas (ADR 0017).

`check` is offline (files only) and runs in CI: every subject's version chain must keep its
declared compatibility mode, and every old version must have an upcaster chain to the current
one. `register` pushes the shipped schemas to the database registry, which re-checks them.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mercato.bootstrap import build_database
from mercato.config import get_settings
from mercato.kit.clock import SystemClock
from mercato.kit.schemas import (
    IncompatibleSchema,
    SchemaCatalog,
    SchemaCatalogError,
    SchemaRegistry,
    UnsupportedSchema,
    Upcasters,
    dataschema_uri,
)
from mercato.schemas import SCHEMA_DIR, UPCASTERS

app = typer.Typer(help="Check, list, show and register the integration-event schemas.", no_args_is_help=True)
_out = Console()
# Soft wrap: a failure line names a subject, a JSON Pointer and a rule; grep-able, not re-flowed.
_err = Console(stderr=True, soft_wrap=True)

DirOption = Annotated[
    Path | None, typer.Option("--dir", help="Schema directory (default: the shipped schemas)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON")]


def _load(directory: Path | None) -> SchemaCatalog:
    try:
        return SchemaCatalog.load(directory or SCHEMA_DIR)
    except SchemaCatalogError as exc:
        _err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


def catalog_failures(catalog: SchemaCatalog, upcasters: Upcasters) -> list[dict[str, Any]]:
    """Every break of a declared mode, and every old version no upcaster chain leads from."""
    failures = [
        {"subject": name, "version": version, "problem": str(problem)}
        for name, items in catalog.problems().items()
        for version, problem in items
    ]
    steps = set(upcasters.steps())
    for name, subject in catalog.subjects.items():
        for version in range(1, subject.current_version):
            if (name, version) not in steps:
                failures.append(
                    {
                        "subject": name,
                        "version": version,
                        "problem": f"no upcaster v{version} -> v{version + 1}",
                    }
                )
    return failures


@app.command("check")
def check(directory: DirOption = None, as_json: JsonOption = False) -> None:
    """Fail (exit 1) when a subject's versions break its declared compatibility mode."""
    catalog = _load(directory)
    failures = catalog_failures(catalog, UPCASTERS)
    if as_json:
        typer.echo(json.dumps({"subjects": len(catalog.subjects), "failures": failures}))
    else:
        for failure in failures:
            _err.print(f"[red]✗[/red] {failure['subject']} v{failure['version']}: {failure['problem']}")
        if not failures:
            versions = sum(s.current_version for s in catalog.subjects.values())
            _err.print(
                f"[green]✓[/green] {len(catalog.subjects)} subjects, {versions} schema versions compatible"
            )
    if failures:
        raise typer.Exit(1)


@app.command("list")
def list_subjects(directory: DirOption = None, as_json: JsonOption = False) -> None:
    """The subjects, their modes and current versions."""
    catalog = _load(directory)
    rows = [
        {
            "subject": name,
            "compatibility": subject.compatibility.value,
            "current_version": subject.current_version,
            "dataschema": dataschema_uri(name, subject.current_version),
            "fingerprint": catalog.fingerprints[(name, subject.current_version)],
        }
        for name, subject in sorted(catalog.subjects.items())
    ]
    if as_json:
        typer.echo(json.dumps({"items": rows}))
        return
    table = Table(title=f"Event schemas ({len(rows)})")
    for column in ("subject", "compatibility", "current_version", "dataschema"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            *(str(row[key]) for key in ("subject", "compatibility", "current_version", "dataschema"))
        )
    _out.print(table)


@app.command("show")
def show(
    subject: Annotated[str, typer.Argument(help="The event type, e.g. mercato.orders.order_completed")],
    version: Annotated[int | None, typer.Option(min=1, help="The version (default: current)")] = None,
    directory: DirOption = None,
) -> None:
    """Print one schema version as JSON."""
    catalog = _load(directory)
    try:
        entry = catalog.subject(subject)
        schema = entry.schema(version or entry.current_version)
    except KeyError as exc:
        _err.print(f"[red]error:[/red] {exc.args[0]}")
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(schema, indent=2))


class _VersionDrift(Exception):
    """The registry numbers a subject's versions differently from the files (edited by hand)."""


async def _register(catalog: SchemaCatalog) -> list[dict[str, Any]]:
    db = build_database(get_settings())
    registry = SchemaRegistry(db, clock=SystemClock())
    report: list[dict[str, Any]] = []
    try:
        for name, subject in sorted(catalog.subjects.items()):
            await registry.set_compatibility(name, subject.compatibility)
            for number, schema in enumerate(subject.versions, start=1):
                stored = await registry.register(name, schema)
                if stored.version != number:
                    raise _VersionDrift(
                        f"{name}: v{number} of the files is version {stored.version} in the registry"
                    )
                report.append({"subject": name, "version": stored.version, "fingerprint": stored.fingerprint})
    finally:
        await db.dispose()
    return report


@app.command("register")
def register(directory: DirOption = None, as_json: JsonOption = False) -> None:
    """Push the schemas to the database registry (idempotent; expects migrations applied)."""
    catalog = _load(directory)
    try:
        report = asyncio.run(_register(catalog))
    except (IncompatibleSchema, UnsupportedSchema, _VersionDrift) as exc:
        _err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps({"items": report}))
    else:
        _err.print(f"[green]✓[/green] {len(report)} schema versions registered")
