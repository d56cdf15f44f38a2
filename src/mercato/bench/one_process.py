"""``mercato bench one-process PART``: one part of a checkout's work driven in this process, with
its CPU and statements per item: what `bench checkout`'s whole-system figures cannot attribute.

Each part is a file of its own that imports only long-standing APIs, so the same file can measure an
older ``src/`` through ``PYTHONPATH`` (``python src/mercato/bench/ledger_cpu.py DB N BATCH``) for a
before/after pair; that is why each keeps its own few lines of database set-up instead of sharing
them. Every part creates DATABASE anew on the local PostgreSQL (127.0.0.1:5432, user postgres);
`run_part` alone drops it after (a part run on its own leaves it for the next run's create to drop).
No part runs the primary's reachability prober (`probe_interval_s=0`): its thread's CPU would be
counted in the part's, and one slow probe on a loaded machine, with a connection held past the
probe's timeout, ended a CI run's part with "connection was closed" (a bench has no request to
fail fast).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import sys
from typing import Annotated, TextIO

import asyncpg
import typer
from rich.console import Console
from rich.text import Text

from mercato.bench.harness import OutOption, RunFolder

# part → (module, what --batch means for it)
PARTS: dict[str, tuple[str, str]] = {
    "saga": ("mercato.bench.saga_cpu", "unused: the saga runner's order sagas, one at a time"),
    "ledger": ("mercato.bench.ledger_cpu", "payment events per consumer pass"),
    "projection": ("mercato.bench.projection_cpu", "orders per projector pass"),
    "relay": ("mercato.bench.relay_cpu", "outbox messages per relay pass"),
    "inventory": ("mercato.bench.inventory_cpu", "cart lines per reservation"),
}


ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


async def _drop(database: str) -> None:
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await admin.close()


def run_part(part: str, database: str, count: int, batch: int) -> None:
    """Run PART against DATABASE (created anew by the part), then drop DATABASE whatever happened."""
    module = importlib.import_module(PARTS[part][0])
    try:
        if part == "saga":
            module.main(database, count)
        elif part == "inventory":
            asyncio.run(module.main(database, count, batch))
        else:
            module.main(database, count, batch)
    finally:
        asyncio.run(_drop(database))


class _Tee(io.StringIO):
    """Keeps what a part prints, and passes it on to the terminal."""

    def __init__(self, terminal: TextIO) -> None:
        super().__init__()
        self._terminal = terminal

    def write(self, text: str) -> int:
        self._terminal.write(text)
        return super().write(text)


def one_process_command(
    part: Annotated[str, typer.Argument(help="saga | ledger | projection | relay | inventory")],
    database: Annotated[str, typer.Option(help="PostgreSQL database to create anew (dropped after)")],
    count: Annotated[
        int, typer.Option(min=1, help="items measured (orders, events, messages, rounds)")
    ] = 300,
    batch: Annotated[
        int, typer.Option(min=1, help="per part: " + "; ".join(f"{k}: {v[1]}" for k, v in PARTS.items()))
    ] = 10,
    out: OutOption = None,
) -> None:
    """Drive one part of a checkout's work in this process; print its CPU and statements per item."""
    if part not in PARTS:
        raise typer.BadParameter(f"part is one of {', '.join(PARTS)}")
    printed = _Tee(sys.stdout)
    with contextlib.redirect_stdout(printed):
        run_part(part, database, count, batch)
    lines = [line for line in printed.getvalue().splitlines() if line.strip()]
    RunFolder.open(f"bench-one-process-{part}", out).record(
        data={"part": part, "database": database, "count": count, "batch": batch, "printed": lines},
        tables=[Text("\n".join(lines))],
        console=Console(stderr=True),
    )
