"""SQLite run on the event loop's own thread: `Database`'s interface without aiosqlite's thread hops.

aiosqlite runs every call on a worker thread: a statement is 3–4 hand-offs (cursor, execute,
fetch, close), each a queue put, a thread wake-up and a self-pipe write back to the loop. On this
kind of VM a hand-off costs tens of microseconds of CPU, so a simulated PSP request (two small
transactions) spent ~7 ms of CPU, nearly all of it in hand-offs, while SQLite itself needs a few
hundred microseconds for the same work (WAL, `synchronous=NORMAL`: a commit does not fsync).

Running SQLite inline blocks the loop for as long as a statement takes, and a writer that finds the
file locked would block it for the whole busy timeout. So this is only for a database that one
process owns and whose statements are short: the simulated providers' own ledgers
(`mercato provider psp|carrier`, and the same apps inside `mercato up`). Their writers queue on an
asyncio lock like `Database`'s, and a transaction never awaits anything but its own statements
(checked: the lock is held across the whole `write()` scope, so two coroutines never interleave
statements on the one connection).
"""

from __future__ import annotations

import asyncio
import sqlite3
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, cast

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, CursorResult, Engine, make_url
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.base import Executable

from mercato.kit.storage.database import LoopLocks, loop_lock, prepare_sqlite_connection
from mercato.kit.storage.statements import DriverStatement, Statements, Unprepared

__all__ = ["InlineConnection", "InlineResult", "InlineSqliteDatabase", "SqlConnection", "SqlDatabase"]


class SqlConnection(Protocol):
    """What the providers' code asks of a connection: an `AsyncConnection` or an `InlineConnection`."""

    async def execute(self, statement: Executable, parameters: Any = None) -> CursorResult[Any]: ...


class SqlDatabase(Protocol):
    """The part of `Database` the providers use, met by `Database` and `InlineSqliteDatabase`."""

    @property
    def url(self) -> URL: ...

    def read(self) -> Any: ...

    def write(self) -> Any: ...

    async def ping(self) -> None: ...

    async def dispose(self) -> None: ...


class InlineConnection:
    """An awaitable face on a synchronous connection: each call runs at once, on this thread.

    A statement registered for the driver path (`driver_prepared`) run with one parameter dict
    skips SQLAlchemy's execution: its SQL, compiled once (`Statements`), goes to sqlite3's own
    cursor in the same transaction, and comes back as an `InlineResult`. SQLAlchemy's per-execute
    work (context, parameter processing, result set-up) cost more CPU than SQLite's for the
    simulators' small inserts and keyed reads (ADR 0088)."""

    def __init__(self, connection: Connection, statements: Statements) -> None:
        self.sync_connection = connection
        self._statements = statements

    async def execute(self, statement: Executable, parameters: Any = None) -> CursorResult[Any]:
        if isinstance(parameters, dict) and isinstance(statement, ClauseElement):
            try:
                prepared = self._statements.get(statement)
            except Unprepared:
                pass
            else:
                return cast("CursorResult[Any]", self._run(prepared, parameters))
        result: CursorResult[Any] = self.sync_connection.execute(statement, parameters)
        return result

    def _run(self, prepared: DriverStatement, parameters: dict[str, Any]) -> InlineResult:
        raw: Any = self.sync_connection.connection.dbapi_connection
        # Not `observe`d: the shop's statement counters listen to the driver path process-wide,
        # and a simulator's own database is another company's, not the shop's (as in the bench probe).
        args = prepared.args(parameters)
        try:
            cursor = raw.execute(prepared.sql, args)
        except sqlite3.Error as error:
            # Raised as SQLAlchemy raises it (`IntegrityError` for a taken key, ...), as on its path.
            self.sync_connection._handle_dbapi_exception(error, prepared.sql, args, None, None)  # type: ignore[arg-type]
            raise
        try:
            if cursor.description is None:
                return InlineResult((), [], cursor.rowcount)
            names = tuple(column[0] for column in cursor.description)
            return InlineResult(names, prepared.rows(cursor.fetchall()), cursor.rowcount)
        finally:
            cursor.close()


class InlineResult:
    """A registered statement's outcome, read the ways the providers read one off a `CursorResult`:
    `rowcount`, `mappings().first()`, `scalar()`. A newly registered statement read another way
    needs that way added here."""

    __slots__ = ("_names", "_rows", "rowcount")

    def __init__(self, names: tuple[str, ...], rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self._names = names
        self._rows = rows
        self.rowcount = rowcount

    def mappings(self) -> _Mappings:
        return _Mappings([dict(zip(self._names, row, strict=True)) for row in self._rows])

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None


class _Mappings:
    __slots__ = ("_rows",)

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self._rows = rows

    def first(self) -> dict[str, Any] | None:
        return self._rows[0] if self._rows else None


class InlineSqliteDatabase:
    """One SQLite connection used from the loop's thread; reads and writes take turns on it."""

    def __init__(self, url: str | URL, *, busy_timeout_s: float = 5.0) -> None:
        parsed = make_url(url)
        if parsed.get_backend_name() != "sqlite":
            raise ValueError(f"inline SQLite needs a sqlite URL, not {parsed.get_backend_name()}")
        sync_url = parsed.set(drivername="sqlite+pysqlite")
        if sync_url.database and sync_url.database != ":memory:":
            Path(sync_url.database).parent.mkdir(parents=True, exist_ok=True)
        # One connection for the process (StaticPool): statements never overlap, so a second one
        # would only add a second lock holder for SQLite to arbitrate.
        self.engine: Engine = create_engine(
            sync_url,
            poolclass=StaticPool,
            connect_args={"check_same_thread": False, "timeout": busy_timeout_s},
        )
        self._statements = Statements(self.engine.dialect)
        self._url = parsed
        _configure(self.engine, busy_timeout_s=busy_timeout_s)
        self._locks: LoopLocks = weakref.WeakKeyDictionary()

    @property
    def url(self) -> URL:
        return self._url

    @asynccontextmanager
    async def read(self) -> AsyncIterator[InlineConnection]:
        async with self._turn(), self._transaction(write=False) as conn:
            yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[InlineConnection]:
        async with self._turn(), self._transaction(write=True) as conn:
            yield conn

    @asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[InlineConnection]:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield InlineConnection(conn, self._statements)
            except BaseException:
                conn.rollback()
                raise
            if write:
                conn.commit()
            else:
                conn.rollback()

    def _turn(self) -> asyncio.Lock:
        # A scope may await between its statements (the callers' code is async): without taking
        # turns, a second coroutine's BEGIN would land inside the first one's transaction.
        return loop_lock(self._locks)

    async def ping(self) -> None:
        async with self.read() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        self.engine.dispose()


def _configure(engine: Engine, *, busy_timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        prepare_sqlite_connection(dbapi_connection, busy_timeout_s=busy_timeout_s)
