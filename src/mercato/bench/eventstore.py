"""``mercato bench eventstore``: append and replay events/s, our event store vs `eventsourcing`.

Same work on both sides, same run, same servers, the sides taking turns (`ROUNDS`): `aggregates`
streams of `events` events each, appended `batch` events per transaction with the expected version
checked, then every stream loaded back in version order (the replay of an aggregate without
snapshots). Each event's data is the same small JSON object, encoded and decoded on both sides.

Ours: `EventStore.append` / `EventStore.load` through our async engine (aiosqlite, asyncpg), one
write transaction per append, as a use case runs it. `eventsourcing` 9.5: its application recorders
(`SQLiteApplicationRecorder`, `PostgresApplicationRecorder`: the ones with a global notification id,
like our position) through its own sync drivers (sqlite3, psycopg 3), `insert_events` per append and
`select_events` per stream. Recorders rather than its `Application`, so both sides do store work
only (no domain objects, topics or transcoders on its side, no aggregates on ours).

Each side gets its own fresh SQLite file / PostgreSQL database, created and dropped by the run.

Equal durability on SQLite: both sides run WAL with the same `synchronous` (`--sqlite-synchronous`,
read back from each side's connection before the run). The library leaves SQLite's default, FULL
(an fsync of the WAL per commit: a commit survives a power loss); we run NORMAL (no fsync per
commit: it survives a process crash, not a power loss or an OS crash). Comparing the two defaults
compared an fsync against none (ADR 0058).

CPU per append: the process's CPU time (`time.process_time`: the loop and aiosqlite's thread on
our side) over the appends, so a loaded machine shows in the rates but much less in this figure.
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
    ours_append_cpu_us: float
    lib_append_cpu_us: float
    # SQLite: the `synchronous` both sides ran with; "" on PostgreSQL.
    synchronous: str = ""

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


@dataclass(frozen=True, slots=True)
class SideResult:
    append_per_s: float
    replay_per_s: float
    append_cpu_us: float


class _Ours:
    def __init__(self, db: Database, work: Workload) -> None:
        self.db, self.work, self.store = db, work, EventStore()

    async def append(self, stream_ids: list[str]) -> None:
        for stream_id in stream_ids:
            version = 0
            for numbers in self.work.batches():
                async with self.db.write() as conn:
                    await self.store.append(
                        conn,
                        stream_id,
                        [NewEvent(EVENT_TYPE, self.work.payload(n)) for n in numbers],
                        expected_version=version,
                    )
                version += len(numbers)

    async def replay(self, stream_ids: list[str]) -> int:
        loaded = 0
        for stream_id in stream_ids:
            async with self.db.read() as conn:
                loaded += len(await self.store.load(conn, stream_id))
        return loaded


class _Library:
    def __init__(
        self,
        recorder: SQLiteApplicationRecorder | PostgresApplicationRecorder,
        work: Workload,
        *,
        in_thread: bool,
    ) -> None:
        self.recorder, self.work, self.in_thread = recorder, work, in_thread

    async def append(self, stream_ids: list[str]) -> None:
        if self.in_thread:
            await asyncio.to_thread(self._append, stream_ids)
        else:
            self._append(stream_ids)

    async def replay(self, stream_ids: list[str]) -> int:
        return (
            await asyncio.to_thread(self._replay, stream_ids) if self.in_thread else self._replay(stream_ids)
        )

    def _append(self, stream_ids: list[str]) -> None:
        from eventsourcing.persistence import StoredEvent

        for stream_id in stream_ids:
            for numbers in self.work.batches():
                self.recorder.insert_events(
                    [
                        StoredEvent(
                            originator_id=stream_id,
                            originator_version=n + 1,
                            topic=EVENT_TYPE,
                            state=json.dumps(self.work.payload(n)).encode(),
                        )
                        for n in numbers
                    ]
                )

    def _replay(self, stream_ids: list[str]) -> int:
        loaded = 0
        for stream_id in stream_ids:
            for stored in self.recorder.select_events(stream_id):
                json.loads(stored.state)
                loaded += 1
        return loaded


# The appends run in this many rounds, the sides taking turns (and turns about who goes first), so
# both meet the same disk and the same neighbours: an fsync's cost drifts by 2-3x within a minute
# on a shared disk, which made whichever side ran second look faster or slower.
ROUNDS = 10


async def _compare(ours: _Ours, lib: _Library, work: Workload) -> tuple[SideResult, SideResult]:
    streams = {side: [str(uuid.uuid4()) for _ in range(work.aggregates)] for side in ("ours", "lib")}
    sides: dict[str, _Ours | _Library] = {"ours": ours, "lib": lib}
    wall = dict.fromkeys(sides, 0.0)
    cpu = dict.fromkeys(sides, 0.0)
    per_round = -(-work.aggregates // ROUNDS)
    for turn in range(ROUNDS):
        order = ("ours", "lib") if turn % 2 == 0 else ("lib", "ours")
        for name in order:
            chunk = streams[name][turn * per_round : (turn + 1) * per_round]
            started_cpu, started = time.process_time(), time.perf_counter()
            await sides[name].append(chunk)
            wall[name] += time.perf_counter() - started
            cpu[name] += time.process_time() - started_cpu
    results = []
    appends = work.aggregates * len(work.batches())
    for name, side in sides.items():
        started = time.perf_counter()
        loaded = await side.replay(streams[name])
        replay_s = time.perf_counter() - started
        if loaded != work.total:
            raise RuntimeError(f"{name} replayed {loaded} of {work.total} events")
        results.append(SideResult(work.total / wall[name], work.total / replay_s, cpu[name] / appends * 1e6))
    return results[0], results[1]


async def _create_tables(db: Database) -> None:
    async with db.engine.begin() as conn:
        await conn.run_sync(lambda sync: metadata.create_all(sync, tables=[events, snapshots]))


async def _sqlite(work: Workload, synchronous: str) -> EventStoreBenchResult:
    # Imported here: `eventsourcing` is a dev extra, and `mercato bench` must load without it.
    from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

    with tempfile.TemporaryDirectory(prefix="mercato-bench-es-") as tmp:
        db = create_database(f"sqlite+aiosqlite:///{Path(tmp) / 'ours.db'}", sqlite_synchronous=synchronous)
        datastore = SQLiteDatastore(db_name=str(Path(tmp) / "lib.db"))
        try:
            await _create_tables(db)
            async with db.read() as conn:
                ours_sync = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar_one()
            # The library has no setting for it: set it on each connection its pool opens (lazily).
            create_connection = datastore.pool._create_connection

            def with_synchronous() -> Any:
                connection = create_connection()
                connection.cursor().execute(f"PRAGMA synchronous={synchronous}")
                return connection

            datastore.pool._create_connection = with_synchronous  # type: ignore[method-assign]
            recorder = SQLiteApplicationRecorder(datastore, events_table_name="stored_events")
            recorder.create_table()
            with datastore.transaction(commit=False) as cursor:
                cursor.execute("PRAGMA synchronous")
                lib_sync = cursor.fetchone()[0]
            if (ours_sync, lib_sync) != (_SYNCHRONOUS_LEVEL[synchronous],) * 2:
                raise RuntimeError(f"synchronous: ours {ours_sync}, library {lib_sync}; wanted {synchronous}")
            ours, lib = await _compare(_Ours(db, work), _Library(recorder, work, in_thread=False), work)
        finally:
            datastore.close()
            await db.dispose()
    return _result("sqlite", work, ours, lib, synchronous)


# What `PRAGMA synchronous` reads back.
_SYNCHRONOUS_LEVEL = {"NORMAL": 1, "FULL": 2}


def _result(
    backend: str, work: Workload, ours: SideResult, lib: SideResult, synchronous: str = ""
) -> EventStoreBenchResult:
    return EventStoreBenchResult(
        backend,
        work.total,
        ours.append_per_s,
        lib.append_per_s,
        ours.replay_per_s,
        lib.replay_per_s,
        ours.append_cpu_us,
        lib.append_cpu_us,
        synchronous,
    )


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
        datastore = PostgresDatastore(
            dbname=names[1],
            host=admin.host or "127.0.0.1",
            port=admin.port or 5432,
            user=admin.username or "postgres",
            password=admin.password or "",
            originator_id_type="text",
        )
        try:
            await _create_tables(db)
            recorder = PostgresApplicationRecorder(datastore, events_table_name="stored_events")
            recorder.create_table()
            # The library's psycopg calls block: on a thread, so ours keeps a running loop.
            ours, lib = await _compare(_Ours(db, work), _Library(recorder, work, in_thread=True), work)
        finally:
            datastore.close()
            await db.dispose()
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            for name in names:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
    return _result("postgresql", work, ours, lib)


async def run_eventstore_bench(
    *,
    backends: list[str],
    aggregates: int,
    events_per_aggregate: int,
    batch: int,
    pg_admin_dsn: str,
    sqlite_synchronous: str = "NORMAL",
) -> list[EventStoreBenchResult]:
    """Each backend once: ours and the library taking turns (`ROUNDS`), on the same workload."""
    work = Workload(aggregates=aggregates, events=events_per_aggregate, batch=batch)
    results = []
    for backend in backends:
        if backend == "sqlite":
            results.append(await _sqlite(work, sqlite_synchronous.upper()))
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
    sqlite_synchronous: Annotated[
        str,
        typer.Option(
            help="SQLite `synchronous` of BOTH sides: NORMAL (the shop default) or FULL (the library default)"
        ),
    ] = "NORMAL",
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
            sqlite_synchronous=sqlite_synchronous,
        )
    )
    table = Table(title=f"Event store: {aggregates} streams x {events} events, {batch} per append")
    columns = ("backend", "ours append/s", "lib append/s", "append ours/lib", "CPU µs/append ours", "lib")
    for column in (*columns, "ours replay/s", "lib replay/s", "replay ours/lib"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for r in results:
        table.add_row(
            f"{r.backend} ({r.synchronous})" if r.synchronous else r.backend,
            f"{r.ours_append_per_s:,.0f}",
            f"{r.lib_append_per_s:,.0f}",
            f"{r.append_ratio:.0%}",
            f"{r.ours_append_cpu_us:,.0f}",
            f"{r.lib_append_cpu_us:,.0f}",
            f"{r.ours_replay_per_s:,.0f}",
            f"{r.lib_replay_per_s:,.0f}",
            f"{r.replay_ratio:.0%}",
        )
    Console().print(table)
    data = {
        "aggregates": aggregates,
        "events_per_aggregate": events,
        "batch": batch,
        "sqlite_synchronous": sqlite_synchronous.upper(),
        "results": [
            {**asdict(r), "append_ratio": round(r.append_ratio, 3), "replay_ratio": round(r.replay_ratio, 3)}
            for r in results
        ],
    }
    RunFolder.open("bench-eventstore", out).record(data=data, tables=[table], console=Console(stderr=True))
