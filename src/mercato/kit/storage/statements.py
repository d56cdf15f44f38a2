"""Hot statements on the raw drivers: the one place that decides how a statement runs.

SQLAlchemy stays for the schema, the migrations and the cold queries. A hot statement (the stream's
appends, probes and acks, a projector's probe, product-by-id) is a Core statement built once and
registered with `driver_prepared`; it is compiled once per dialect (`Statements`) and run on the
driver's own connection, asyncpg's or aiosqlite's: one round trip (PostgreSQL) or one thread hop
(SQLite) per statement, where SQLAlchemy's async adapter costs several, with the column types'
conversions applied as SQLAlchemy would. Callers never branch on the engine:

- `DriverReads(db).rows(statement, params)`: one autocommitted SELECT (no BEGIN/ROLLBACK), on a
  driver connection shared by back-to-back statements;
- `driver_transaction(db, statements)`: a write transaction on the driver path (an `Executor`);
  a statement it does not carry raises `Unprepared`, and the caller redoes the work through
  `SqlAlchemyExecutor` on a `Database.write()` connection (same `Executor` interface);
- `driver_read_then_write(db, statements)`: reads and at most one write, with no BEGIN/COMMIT on
  PostgreSQL (a write transaction on SQLite);
- `on_connection(conn)` (`statements_in_tx.py`): registered statements inside the caller's
  SQLAlchemy transaction (a `Database.write()`, `Database.autocommit()` or `Database.read()`
  connection), sent on the driver connection under it: the saga runner's moves, the outbox, the
  inbox join a transaction whose other statements (a saga step's, a consumer handler's) still go
  through SQLAlchemy.

Statement counters (tests, the bench probe) see the driver path through `add_driver_listener`,
since SQLAlchemy's engine events never do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Protocol, TypeVar, cast

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer
from sqlalchemy import Executable, Select, Table, UpdateBase
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util import greenlet_spawn

from mercato.kit.storage.database import Database

__all__ = [
    "DriverReads",
    "DriverStatement",
    "Executor",
    "SharedDriverConnection",
    "SqlAlchemyExecutor",
    "Statements",
    "Unprepared",
    "add_driver_listener",
    "autocommit_rows",
    "driver_connection",
    "driver_prepared",
    "driver_read_then_write",
    "driver_transaction",
    "insert_ignore",
    "insert_new",
    "observe",
    "trace_driver_statements",
    "tracing_statements",
]

_S = TypeVar("_S", bound=ClauseElement)


# What the driver path runs (registered with `driver_prepared`); any other statement sends the
# operation back through SQLAlchemy.
_PREPARED: set[ClauseElement] = set()


# Writes chained in one statement through data-modifying CTEs (`driver_prepared(..., in_turn=...)`),
# and the same writes as separate statements for an engine that has no such CTEs (SQLite).
_IN_TURN: dict[int, tuple[ClauseElement, ...]] = {}
# Which of those separate statements returns what the chained one does, when not the first.
_IN_TURN_ROWS: dict[int, int] = {}


def driver_prepared(statement: _S, *, in_turn: Sequence[ClauseElement] = (), rows_from: int = 0) -> _S:
    """Let `statement` (module-level or otherwise built once, with only named bind parameters) run
    on the driver path, e.g. through `DriverReads`.

    `in_turn`: when `statement` chains writes through data-modifying CTEs (PostgreSQL), the same
    writes as separate statements for SQLite, which has none. `on_connection` runs those one after
    the other with the same parameters, stopping after one with RETURNING that returned no row (the
    fenced write that matched nothing, after which the chained form writes nothing either), and
    returns the rows of the one at index `rows_from` (the first by default; none when they stopped
    before it), which must return what `statement` returns."""
    _PREPARED.add(statement)
    if in_turn:
        if not 0 <= rows_from < len(in_turn):
            raise ValueError("rows_from must name one of the in_turn statements")
        _IN_TURN[id(statement)] = tuple(driver_prepared(part) for part in in_turn)
        if rows_from:
            _IN_TURN_ROWS[id(statement)] = rows_from
    return statement


DriverListener = Callable[[str | None], None]
_DRIVER_LISTENERS: list[DriverListener] = []


def add_driver_listener(listener: DriverListener) -> Callable[[], None]:
    """Observe what the driver path sends, which SQLAlchemy's engine events never see: `listener`
    gets each statement's SQL, and None at the end (commit or rollback) of each driver-path
    transaction that ran one. For statement counters (tests, the bench probe); returns the remover."""
    _DRIVER_LISTENERS.append(listener)
    return lambda: _DRIVER_LISTENERS.remove(listener)


def observe(sql: str | None) -> None:
    for listener in _DRIVER_LISTENERS:
        listener(sql)


# SQLAlchemy's engine events (where `instrument_engine` opens a span per statement) never see the
# driver path, so it opens its own client spans once `trace_driver_statements` gave it a tracer.
_tracing: tuple[Tracer, bool] | None = None


def trace_driver_statements(tracer: Tracer | None, *, only_in_trace: bool = False) -> None:
    """Open a client span (db.* attributes) around every driver-path statement; None turns it off.
    `only_in_trace`: statements outside any trace get none (idle polls would each start a trace)."""
    global _tracing
    _tracing = None if tracer is None else (tracer, only_in_trace)


@contextmanager
def _statement_span(sql: str, system: str) -> Iterator[None]:
    tracing = _tracing
    if tracing is None or (tracing[1] and not trace.get_current_span().get_span_context().is_valid):
        yield
        return
    operation = sql.lstrip().split(" ", 1)[0].upper()
    attributes = {"db.system": system, "db.operation": operation, "db.statement": sql[:2000]}
    with tracing[0].start_as_current_span(operation, kind=SpanKind.CLIENT, attributes=attributes):
        yield


@dataclass(frozen=True, slots=True)
class DriverStatement:
    """A Core statement compiled once for one dialect, with its parameter order and the column
    types' conversions, to run on the driver's connection."""

    sql: str
    names: tuple[str, ...]
    binds: tuple[Callable[[Any], Any] | None, ...]
    results: tuple[Callable[[Any], Any] | None, ...]
    # The values written into the statement itself (`status == 'replaying'`): bound like the rest.
    fixed: dict[str, Any]
    # `names`' values out of a parameter dict in one C call, and the positions a conversion applies
    # to (`args`; a one-event append binds eight values and converts one, ADR 0069).
    pick: Callable[[dict[str, Any]], Any]
    converted: tuple[int, ...]

    @classmethod
    def compile(cls, statement: ClauseElement, dialect: Dialect) -> DriverStatement:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        names = tuple(compiled.positiontup or ())
        # The result columns whose types convert what the driver returns (a SELECT's, a RETURNING's).
        columns: Any = ()
        if isinstance(statement, Select):
            columns = statement.selected_columns
        elif isinstance(statement, UpdateBase):
            columns = statement.exported_columns
        binds = tuple(
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
        )
        return cls(
            sql=str(compiled),
            names=names,
            binds=binds,
            results=tuple(
                column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
            ),
            fixed={name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required},
            pick=_picker(names),
            converted=tuple(i for i, process in enumerate(binds) if process is not None),
        )

    def args(self, values: dict[str, Any]) -> list[Any]:
        if self.fixed:
            values = {**self.fixed, **values}
        # The values in one C call, then only the conversions there are: on SQLite's loop path
        # this list was a fifth of an append's Python work (ADR 0064, 0069).
        args: list[Any] = self.pick(values)
        binds = self.binds
        for i in self.converted:
            args[i] = binds[i](args[i])  # type: ignore[misc]  # `converted` lists non-None ones
        return args

    def rows(self, records: Sequence[Any]) -> list[tuple[Any, ...]]:
        if not any(self.results):
            return [tuple(record) for record in records]
        return [
            tuple(v if process is None else process(v) for process, v in zip(self.results, r, strict=True))
            for r in records
        ]

    @property
    def converts_results(self) -> bool:
        return any(self.results)


def _picker(names: tuple[str, ...]) -> Callable[[dict[str, Any]], list[Any]]:
    """`names`' values of a dict as a new list, in order (a KeyError for a missing one)."""
    if not names:
        return lambda _values: []
    if len(names) == 1:
        (name,) = names
        return lambda values: [values[name]]
    get = itemgetter(*names)
    return lambda values: list(get(values))


def tracing_statements() -> bool:
    """Whether driver-path statements open spans (`trace_driver_statements`)."""
    return _tracing is not None


class Unprepared(Exception):
    """The driver path met a statement it does not carry: redo the operation through SQLAlchemy."""


class Executor(Protocol):
    """Runs registered statements in one transaction; rows come back as plain tuples."""

    async def rows(
        self, statement: ClauseElement, params: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]: ...

    async def run(
        self, statement: ClauseElement, params: dict[str, Any] | list[dict[str, Any]] | None = None
    ) -> None: ...

    async def insert_ignore(
        self, table: Table, rows: list[dict[str, Any]], *, conflict: list[str]
    ) -> None: ...


class SqlAlchemyExecutor:
    """Every statement, through a SQLAlchemy connection: the general path."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def rows(
        self, statement: ClauseElement, params: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        result = await self._conn.execute(cast(Executable, statement), params)
        return [tuple(row) for row in result]

    async def run(
        self, statement: ClauseElement, params: dict[str, Any] | list[dict[str, Any]] | None = None
    ) -> None:
        await self._conn.execute(cast(Executable, statement), params)

    async def insert_ignore(self, table: Table, rows: list[dict[str, Any]], *, conflict: list[str]) -> None:
        await insert_ignore(self._conn, table, rows, conflict=conflict)


class Statements:
    """One dialect's compiled forms of the registered statements (`driver_prepared`), made on first use."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._compiled: dict[int, DriverStatement] = {}

    def get(self, statement: ClauseElement) -> DriverStatement:
        compiled = self._compiled.get(id(statement))
        if compiled is None:
            if statement not in _PREPARED:
                raise Unprepared
            compiled = self._compiled[id(statement)] = DriverStatement.compile(statement, self._dialect)
        return compiled


class DriverExecutor:
    """The hot path: prepared statements on the driver's connection, one thread hop (aiosqlite)
    or one round trip (asyncpg) each, where SQLAlchemy's async adapter costs several."""

    def __init__(self, conn: Any, statements: Statements, *, postgresql: bool) -> None:
        self._conn = conn
        self._statements = statements
        self._postgresql = postgresql
        self._system = "postgresql" if postgresql else "sqlite"

    async def rows(
        self, statement: ClauseElement, params: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        prepared = self._statements.get(statement)
        args = prepared.args(params or {})
        observe(prepared.sql)
        with _statement_span(prepared.sql, self._system):
            if self._postgresql:
                return prepared.rows(await self._conn.fetch(prepared.sql, *args))
            return prepared.rows(await self._conn.execute_fetchall(prepared.sql, args))

    async def run(
        self, statement: ClauseElement, params: dict[str, Any] | list[dict[str, Any]] | None = None
    ) -> None:
        prepared = self._statements.get(statement)
        observe(prepared.sql)
        with _statement_span(prepared.sql, self._system):
            if isinstance(params, list):
                await self._conn.executemany(prepared.sql, [prepared.args(p) for p in params])
            elif self._postgresql:
                await self._conn.execute(prepared.sql, *prepared.args(params or {}))
            else:
                await self._conn.execute_fetchall(prepared.sql, prepared.args(params or {}))

    async def insert_ignore(self, table: Table, rows: list[dict[str, Any]], *, conflict: list[str]) -> None:
        raise Unprepared


@asynccontextmanager
async def driver_connection(db: Database) -> AsyncIterator[Any]:
    """The driver's connection (asyncpg's, aiosqlite's) from `db`'s pool, in autocommit.

    No SQLAlchemy `Connection` around it, so nothing emits BEGIN: each statement commits on its
    own unless the caller begins a transaction. Checkin and invalidation run in a greenlet
    because the pool may close the connection (an overflow connection, a failed one), which the
    async drivers only do awaited. A failure discards the connection (after a cancellation
    mid-statement its state is unknown), except `Unprepared`, raised after a clean rollback.
    """
    pooled = await db.engine.raw_connection()
    try:
        yield pooled.driver_connection
    except Unprepared:
        await greenlet_spawn(pooled.close)
        raise
    except BaseException:
        await greenlet_spawn(pooled.invalidate)
        raise
    await greenlet_spawn(pooled.close)


class SharedDriverConnection:
    """One pooled driver connection shared by back-to-back autocommitted statements: in-order
    acks, and the poll probes and lag reads.

    A consumer acknowledges a batch one message at a time; checking a connection out of the pool
    and back in around each one-statement ack cost about a quarter of the ack. The connection goes
    back to the pool as soon as the event loop runs with no ack using it (the consumer awaited
    something else), so it is never held while the consumer is idle. An ack arriving while another
    one uses it takes its own connection from the pool, so concurrent acks never queue.

    `hold`: keep the connection between uses until `close` (a consumer that runs all the time,
    ADR 0090): the pool hands connections out in turn, and each one it hands prepares the
    consumer's statements again, while a held one prepared them once (`warm`).
    """

    def __init__(self, db: Database, *, hold: bool = False) -> None:
        self._db = db
        self._hold = hold
        self._pooled: PoolProxiedConnection | None = None
        self._busy = False
        self._release_scheduled = False
        self._closing: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def use(self) -> AsyncIterator[Any]:
        if self._busy:
            async with driver_connection(self._db) as conn:
                yield conn
            return
        self._busy = True
        try:
            if self._pooled is None:
                self._pooled = await self._db.engine.raw_connection()
            pooled = self._pooled
            try:
                yield pooled.driver_connection
            except BaseException:
                # Its state is unknown after a failure or a cancellation mid-statement.
                self._pooled = None
                await greenlet_spawn(pooled.invalidate)
                raise
        finally:
            self._busy = False
            if self._pooled is not None and not self._release_scheduled and not self._hold:
                self._release_scheduled = True
                asyncio.get_running_loop().call_soon(self._release_if_unused)

    async def close(self) -> None:
        """Give a held connection back to the pool (a statement using it keeps it until it ends)."""
        self._hold = False
        if not self._busy and self._pooled is not None:
            pooled, self._pooled = self._pooled, None
            await greenlet_spawn(pooled.close)

    def _release_if_unused(self) -> None:
        self._release_scheduled = False
        if self._busy or self._pooled is None:
            return  # the ack using it schedules the release again when it is done
        pooled, self._pooled = self._pooled, None
        # The pool's checkin may close the connection, which the async drivers only do awaited.
        task = asyncio.get_running_loop().create_task(greenlet_spawn(pooled.close))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


async def autocommit_rows(
    connection: SharedDriverConnection,
    statements: Statements,
    statement: ClauseElement,
    params: dict[str, Any],
    *,
    postgresql: bool,
) -> list[tuple[Any, ...]]:
    """One prepared statement, autocommitted on the shared driver connection: one round trip, no
    BEGIN/COMMIT, no pool checkout when the connection is already out."""
    prepared = statements.get(statement)
    args = prepared.args(params)
    async with connection.use() as driver:
        observe(prepared.sql)
        with _statement_span(prepared.sql, "postgresql" if postgresql else "sqlite"):
            if postgresql:
                records = await driver.fetch(prepared.sql, *args)
            else:
                records = await driver.execute_fetchall(prepared.sql, args)
    return prepared.rows(records)


class DriverReads:
    """Single SELECTs run alone, autocommitted on the driver's connection (the poll probes of this
    module, a projector's): one round trip each where `Database.read` adds BEGIN and ROLLBACK and
    SQLAlchemy's adapter overhead. Statements must be registered with `driver_prepared`."""

    def __init__(self, db: Database, *, hold: bool = False) -> None:
        self._postgresql = db.dialect == "postgresql"
        self._statements = Statements(db.engine.dialect)
        self._connection = SharedDriverConnection(db, hold=hold)

    async def rows(self, statement: ClauseElement, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return await autocommit_rows(
            self._connection, self._statements, statement, params, postgresql=self._postgresql
        )

    async def close(self) -> None:
        await self._connection.close()


@asynccontextmanager
async def driver_transaction(db: Database, statements: Statements) -> AsyncIterator[Executor]:
    """A write transaction on the driver's connection, committed on success: BEGIN IMMEDIATE on
    SQLite (the write lock up front, as `Database.write` does), BEGIN on PostgreSQL."""
    postgresql = db.dialect == "postgresql"
    async with driver_connection(db) as conn:
        transaction = conn.transaction() if postgresql else None
        if transaction is not None:
            await transaction.start()
        else:
            await conn.execute_fetchall("BEGIN IMMEDIATE")
        try:
            yield DriverExecutor(conn, statements, postgresql=postgresql)
        except Unprepared:
            await (transaction.rollback() if transaction is not None else conn.rollback())
            observe(None)
            raise
        await (transaction.commit() if transaction is not None else conn.commit())
        db.signals.wrote()
        observe(None)
        if postgresql:
            await db.record_driver_commit(conn)


@asynccontextmanager
async def driver_read_then_write(db: Database, statements: Statements) -> AsyncIterator[Executor]:
    """Reads, then at most one write, on the driver path. PostgreSQL: on one connection with no
    transaction around them; under READ COMMITTED each statement of a transaction takes its own
    snapshot anyway, and one write is atomic alone, so BEGIN and COMMIT would add two round trips
    and nothing else. SQLite: a write transaction (`driver_transaction`), whose write lock, taken
    up front, is what makes the reads and the write see one state."""
    if db.dialect != "postgresql":
        async with driver_transaction(db, statements) as tx:
            yield tx
        return
    async with driver_connection(db) as conn:
        yield DriverExecutor(conn, statements, postgresql=True)
        await db.record_driver_commit(conn)
    db.signals.wrote()


async def insert_ignore(
    conn: AsyncConnection, table: Table, rows: list[dict[str, Any]], *, conflict: list[str]
) -> int:
    """INSERT ... ON CONFLICT DO NOTHING; returns how many rows were inserted.

    Both dialects spell it the same way but SQLAlchemy builds it per dialect.
    """
    if not rows:
        return 0
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    result = await conn.execute(
        dialect_insert(table).values(rows).on_conflict_do_nothing(index_elements=conflict)
    )
    return int(result.rowcount)


async def insert_new(
    conn: AsyncConnection, table: Table, rows: list[dict[str, Any]], *, conflict: list[str], key: str
) -> set[Any]:
    """INSERT ... ON CONFLICT DO NOTHING RETURNING `key`: the keys of the rows that were new, in one
    statement whatever the number of rows (an inbox records a consumer's whole batch this way)."""
    if not rows:
        return set()
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = (
        dialect_insert(table)
        .values(rows)
        .on_conflict_do_nothing(index_elements=conflict)
        .returning(table.c[key])
    )
    return set((await conn.execute(statement)).scalars())
