"""``mercato bench eventstore``: append and replay events/s, our event store vs `eventsourcing`.

Same work on both sides, same run, same servers: `aggregates` streams of `events` events each,
appended `batch` events per transaction with the expected version checked, then every stream
loaded back in version order (the replay of an aggregate without snapshots). Each event's data is
the same small JSON object, encoded and decoded on both sides.

Ours: `EventStore.append` / `EventStore.load` through our async engine (aiosqlite, asyncpg), one
write transaction per append, as a use case runs it. `eventsourcing` 9.5: its application recorders
(`SQLiteApplicationRecorder`, `PostgresApplicationRecorder`: the ones with a global notification id,
like our position) through its own sync drivers (sqlite3, psycopg 3), `insert_events` per append and
`select_events` per stream. Recorders rather than its `Application`, so both sides do store work
only (no domain objects, topics or transcoders on its side, no aggregates on ours).

Each side gets its own fresh SQLite file / PostgreSQL database, created and dropped by the run.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import asyncpg
import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from mercato.bench.harness import OutOption, RunFolder
from mercato.kit.eventstore import EventStore, NewEvent, events, snapshots
from mercato.kit.storage import Database, create_database, metadata

if TYPE_CHECKING:
    from eventsourcing.postgres import PostgresApplicationRecorder
    from eventsourcing.sqlite import SQLiteApplicationRecorder

__all__ = ["EventStoreBenchResult", "eventstore_command", "run_eventstore_bench"]

EVENT_TYPE = "mercato.bench.amount_added"


@dataclass(frozen=True, slots=True)
class EventStoreBenchResult:
    backend: str
    events: int
    ours_append_per_s: float
    lib_append_per_s: float
    ours_replay_per_s: float
    lib_replay_per_s: float

    @property
    def append_ratio(self) -> float:
        return self.ours_append_per_s / self.lib_append_per_s

    @property
    def replay_ratio(self) -> float:
        return self.ours_replay_per_s / self.lib_replay_per_s


@dataclass(frozen=True, slots=True)
class Workload:
    aggregates: int
    events: int
    batch: int

    @property
    def total(self) -> int:
        return self.aggregates * self.events

    def payload(self, n: int) -> dict[str, Any]:
        return {"amount_minor": 100 + n, "currency": "EUR", "note": f"event {n}"}

    def batches(self) -> list[list[int]]:
        """Event numbers of each append of one stream."""
        return [
            list(range(start, min(start + self.batch, self.events)))
            for start in range(0, self.events, self.batch)
        ]


async def _ours(db: Database, work: Workload) -> tuple[float, float]:
    store = EventStore()
    stream_ids = [str(uuid.uuid4()) for _ in range(work.aggregates)]
    started = time.perf_counter()
    for stream_id in stream_ids:
        version = 0
        for numbers in work.batches():
            async with db.write() as conn:
                await store.append(
                    conn,
                    stream_id,
                    [NewEvent(EVENT_TYPE, work.payload(n)) for n in numbers],
                    expected_version=version,
                )
            version += len(numbers)
    append_s = time.perf_counter() - started
    started = time.perf_counter()
    loaded = 0
    for stream_id in stream_ids:
        async with db.read() as conn:
            loaded += len(await store.load(conn, stream_id))
    replay_s = time.perf_counter() - started
    if loaded != work.total:
        raise RuntimeError(f"ours replayed {loaded} of {work.total} events")
    return work.total / append_s, work.total / replay_s


def _library(
    recorder: SQLiteApplicationRecorder | PostgresApplicationRecorder, work: Workload
) -> tuple[float, float]:
    from eventsourcing.persistence import StoredEvent

    stream_ids = [str(uuid.uuid4()) for _ in range(work.aggregates)]
    started = time.perf_counter()
    for stream_id in stream_ids:
        for numbers in work.batches():
            recorder.insert_events(
                [
                    StoredEvent(
                        originator_id=stream_id,
                        originator_version=n + 1,
                        topic=EVENT_TYPE,
                        state=json.dumps(work.payload(n)).encode(),
                    )
                    for n in numbers
                ]
            )
    append_s = time.perf_counter() - started
    started = time.perf_counter()
    loaded = 0
    for stream_id in stream_ids:
        for stored in recorder.select_events(stream_id):
            json.loads(stored.state)
            loaded += 1
    replay_s = time.perf_counter() - started
    if loaded != work.total:
        raise RuntimeError(f"eventsourcing replayed {loaded} of {work.total} events")
    return work.total / append_s, work.total / replay_s


async def _create_tables(db: Database) -> None:
    async with db.engine.begin() as conn:
        await conn.run_sync(lambda sync: metadata.create_all(sync, tables=[events, snapshots]))


async def _sqlite(work: Workload) -> EventStoreBenchResult:
    # Imported here: `eventsourcing` is a dev extra, and `mercato bench` must load without it.
    from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

    with tempfile.TemporaryDirectory(prefix="mercato-bench-es-") as tmp:
        db = create_database(f"sqlite+aiosqlite:///{Path(tmp) / 'ours.db'}")
        try:
            await _create_tables(db)
            ours = await _ours(db, work)
        finally:
            await db.dispose()
        datastore = SQLiteDatastore(db_name=str(Path(tmp) / "lib.db"))
        recorder = SQLiteApplicationRecorder(datastore, events_table_name="stored_events")
        recorder.create_table()
        try:
            lib = _library(recorder, work)
        finally:
            datastore.close()
    return EventStoreBenchResult("sqlite", work.total, ours[0], lib[0], ours[1], lib[1])


async def _postgres(admin_dsn: str, work: Workload) -> EventStoreBenchResult:
    from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

    admin = make_url(admin_dsn)
    names = [f"mercato_bench_es_{side}_{uuid.uuid4().hex[:8]}" for side in ("ours", "lib")]
    conn = await asyncpg.connect(admin_dsn)
    try:
        for name in names:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        db = create_database(str(admin.set(drivername="postgresql+asyncpg", database=names[0])))
        try:
            await _create_tables(db)
            ours = await _ours(db, work)
        finally:
            await db.dispose()
        datastore = PostgresDatastore(
            dbname=names[1],
            host=admin.host or "127.0.0.1",
            port=admin.port or 5432,
            user=admin.username or "postgres",
            password=admin.password or "",
            originator_id_type="text",
        )
        recorder = PostgresApplicationRecorder(datastore, events_table_name="stored_events")
        recorder.create_table()
        try:
            lib = await asyncio.to_thread(_library, recorder, work)
        finally:
            datastore.close()
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            for name in names:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
    return EventStoreBenchResult("postgresql", work.total, ours[0], lib[0], ours[1], lib[1])


async def run_eventstore_bench(
    *, backends: list[str], aggregates: int, events_per_aggregate: int, batch: int, pg_admin_dsn: str
) -> list[EventStoreBenchResult]:
    """Each backend once: ours first, then the library, on the same workload."""
    work = Workload(aggregates=aggregates, events=events_per_aggregate, batch=batch)
    results = []
    for backend in backends:
        if backend == "sqlite":
            results.append(await _sqlite(work))
        elif backend == "postgresql":
            results.append(await _postgres(pg_admin_dsn, work))
        else:
            raise ValueError(f"unknown backend {backend!r} (sqlite, postgresql)")
    return results


def eventstore_command(
    backends: Annotated[str, typer.Option(help="Comma-separated: sqlite,postgresql")] = "sqlite,postgresql",
    aggregates: Annotated[int, typer.Option(help="Streams (aggregates) written and replayed", min=1)] = 100,
    events: Annotated[int, typer.Option(help="Events per stream", min=1)] = 20,
    batch: Annotated[int, typer.Option(help="Events per append (one transaction each)", min=1)] = 1,
    pg_dsn: Annotated[
        str, typer.Option(help="PostgreSQL admin DSN; the run creates and drops its own databases")
    ] = "postgresql://postgres@127.0.0.1:5432/postgres",
    out: OutOption = None,
) -> None:
    """Append and replay events/s: our event store vs the `eventsourcing` library, same run, same work."""
    results = asyncio.run(
        run_eventstore_bench(
            backends=[b.strip() for b in backends.split(",") if b.strip()],
            aggregates=aggregates,
            events_per_aggregate=events,
            batch=batch,
            pg_admin_dsn=pg_dsn,
        )
    )
    table = Table(title=f"Event store: {aggregates} streams x {events} events, {batch} per append")
    columns = ("backend", "ours append/s", "lib append/s", "append ours/lib")
    for column in (*columns, "ours replay/s", "lib replay/s", "replay ours/lib"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for r in results:
        table.add_row(
            r.backend,
            f"{r.ours_append_per_s:,.0f}",
            f"{r.lib_append_per_s:,.0f}",
            f"{r.append_ratio:.0%}",
            f"{r.ours_replay_per_s:,.0f}",
            f"{r.lib_replay_per_s:,.0f}",
            f"{r.replay_ratio:.0%}",
        )
    Console().print(table)
    data = {
        "aggregates": aggregates,
        "events_per_aggregate": events,
        "batch": batch,
        "results": [
            {**asdict(r), "append_ratio": round(r.append_ratio, 3), "replay_ratio": round(r.replay_ratio, 3)}
            for r in results
        ],
    }
    RunFolder.open("bench-eventstore", out).record(data=data, tables=[table], console=Console(stderr=True))
