"""`mercato projections list|lag|rebuild NAME|verify NAME`: inspect, check and rebuild read models.

`rebuild` replays the stream log from offset zero into fresh tables and swaps them in atomically
(see `mercato.kit.projections`); the API keeps serving the old tables until the swap commits.
`verify` compares a read model with the write model (every settled row, or `--sample`), exports
and with `--repair` rebuilds it and checks again; it exits 1 while drift
remains (see `shop/reporting/reconcile.py`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mercato.bootstrap import Container, build_container
from mercato.config import get_settings
from mercato.kit.projections import Projector, RebuildIncomplete, RebuildReport
from mercato.shop.reporting.reconcile import RECONCILED, Drift, Mode
from mercato.workers.projections import build_projectors
from mercato.workers.reconcile import build_reconciler

app = typer.Typer(help="Inspect and rebuild read models (projections).", no_args_is_help=True)
_out = Console()
_err = Console(stderr=True)

T = TypeVar("T")


def _run(action: Callable[[dict[str, Projector]], Awaitable[T]]) -> T:
    return _run_with(lambda _container, projectors: action(projectors))


def _run_with(action: Callable[[Container, dict[str, Projector]], Awaitable[T]]) -> T:
    async def main() -> T:
        container = build_container(get_settings())
        try:
            return await action(container, build_projectors(container))
        finally:
            await container.close()

    return asyncio.run(main())


@dataclass(frozen=True, slots=True)
class _Row:
    name: str
    topics: list[str]
    tables: list[str]
    lag_messages: int


async def _lags(projectors: dict[str, Projector]) -> list[_Row]:
    return [
        _Row(name, list(p.projection.topics), [t.name for t in p.projection.tables], await p.lag())
        for name, p in projectors.items()
    ]


@app.command("list")
def list_projections(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """The projections, their topics, tables and lag."""
    rows = _run(_lags)
    if as_json:
        typer.echo(json.dumps({"items": [asdict(r) for r in rows]}))
        return
    table = Table("name", "topics", "tables", "lag (messages)")
    for row in rows:
        table.add_row(row.name, ", ".join(row.topics), ", ".join(row.tables), str(row.lag_messages))
    _out.print(table)


@app.command("lag")
def lag(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Messages each projection has not applied yet."""
    rows = _run(_lags)
    if as_json:
        typer.echo(json.dumps({r.name: r.lag_messages for r in rows}))
        return
    for row in rows:
        _out.print(f"{row.name}: {row.lag_messages}")


async def _rebuild(projector: Projector) -> RebuildReport:
    try:
        return await projector.rebuild()
    except RebuildIncomplete as exc:
        _err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command("rebuild")
def rebuild(
    name: Annotated[str, typer.Argument(help="The projection to rebuild")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Replay the log from zero into new tables and swap them in atomically."""

    async def action(projectors: dict[str, Projector]) -> dict[str, object]:
        projector = projectors.get(name)
        if projector is None:
            _err.print(f"[red]error:[/red] no projection {name!r}; known: {', '.join(sorted(projectors))}")
            raise typer.Exit(2)
        with _err.status(f"Rebuilding {name}"):
            report = await _rebuild(projector)
        return {
            "name": report.projection,
            "messages": report.messages,
            "duration_s": round(report.duration_s, 3),
            "tables": list(report.tables),
        }

    result = _run(action)
    if as_json:
        typer.echo(json.dumps(result))
        return
    _out.print(
        f"[green]✓[/green] rebuilt {result['name']} from {result['messages']} messages "
        f"in {result['duration_s']} s"
    )


def _drift_json(drift: Drift) -> dict[str, object]:
    return {
        "mode": drift.mode,
        "checked": drift.checked,
        "drift_rows": drift.rows,
        "missing": drift.missing,
        "wrong": drift.wrong,
        "extra": drift.extra,
    }


@app.command("verify")
def verify(
    name: Annotated[str, typer.Argument(help="The read model to check: order_summary or sales_by_day")],
    sample: Annotated[bool, typer.Option("--sample", help="Check a random sample, not every row")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="On drift, rebuild and check again")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Compare a read model with the write model; exit 1 while drift remains."""
    if name not in RECONCILED:
        _err.print(f"[red]error:[/red] no reconciliation for {name!r}; known: {', '.join(RECONCILED)}")
        raise typer.Exit(2)
    mode: Mode = "sample" if sample else "full"

    async def action(container: Container, projectors: dict[str, Projector]) -> dict[str, object]:
        # The worker's job exports the drift as a metric; this one-shot check prints it.
        reconciler = build_reconciler(container)
        found = await reconciler.verify(name, mode=mode)
        result: dict[str, object] = {"name": name, "found": _drift_json(found)}
        if repair and found.rows:
            with _err.status(f"Rebuilding {name}"):
                report = await _rebuild(projectors[name])
            result["rebuilt_from_messages"] = report.messages
            after = await reconciler.verify(name, mode=mode)
            result["after_repair"] = _drift_json(after)
            found = after
        result["drift_rows"] = found.rows
        return result

    result = _run_with(action)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        first = result["found"]
        assert isinstance(first, dict)
        _out.print(f"{name} ({mode}): {first['checked']} checked, {first['drift_rows']} drifted")
        for kind in ("missing", "wrong", "extra"):
            keys = first[kind]
            assert isinstance(keys, list)
            if keys:
                _out.print(f"  {kind}: {len(keys)} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})")
        if "after_repair" in result:
            _out.print(
                f"rebuilt from {result['rebuilt_from_messages']} messages; drift now {result['drift_rows']}"
            )
    if result["drift_rows"]:
        raise typer.Exit(1)
