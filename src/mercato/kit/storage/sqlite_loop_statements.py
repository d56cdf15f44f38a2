"""Registered statements of a SQLite write transaction, run on the event loop's thread (ADR 0062).

Inside a transaction that holds SQLite's write lock (`BEGIN IMMEDIATE`, `sqlite_loop.py`), a small
statement cannot wait for anyone: in WAL mode readers never block a writer and no other writer can
hold the lock. Running it on aiosqlite's thread then buys nothing and costs a hand-off between two
threads (tens of microseconds of CPU, more than the statement). So `transaction_executor` hands the
caller an `Executor` that runs registered statements (`driver_prepared`) directly on the `sqlite3`
connection under aiosqlite's, with the same conversions, listeners and spans as `DriverExecutor`;
anywhere else (no write lock, an aiosqlite call in flight, another driver) the usual one.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement

from mercato.kit.storage.sqlite_loop import LoopState, loop_state
from mercato.kit.storage.statements import (
    DriverExecutor,
    Executor,
    Statements,
    Unprepared,
    _statement_span,
    observe,
    tracing_statements,
)

__all__ = ["LoopExecutor", "transaction_executor"]


class LoopExecutor:
    """Registered statements on a `sqlite3` connection, on this (the loop's) thread."""

    def __init__(self, raw: sqlite3.Connection, statements: Statements) -> None:
        self._raw = raw
        self._statements = statements
        self._cursor: sqlite3.Cursor | None = None

    def inserted_rowid(self, statement: ClauseElement, params: dict[str, Any]) -> int | None:
        """Run an INSERT of at most one row, without RETURNING: the new row's rowid, or None when
        it inserted none. SQLite's RETURNING and the fetch of its row cost a fifth of a one-event
        append (ADR 0064); a single-row INSERT's rowid and change count come with the statement.
        Not a coroutine: it never waits (the write lock is held), and its caller need not be one
        (ADR 0069)."""
        prepared = self._statements.get(statement)
        args = prepared.args(params)
        observe(prepared.sql)
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = self._raw.cursor()
        if tracing_statements():
            with _statement_span(prepared.sql, "sqlite"):
                cursor.execute(prepared.sql, args)
        else:
            cursor.execute(prepared.sql, args)
        if cursor.rowcount != 1:
            return None
        return cursor.lastrowid

    async def rows(
        self, statement: ClauseElement, params: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        prepared = self._statements.get(statement)
        args = prepared.args(params or {})
        observe(prepared.sql)
        if tracing_statements():
            with _statement_span(prepared.sql, "sqlite"):
                records = self._raw.execute(prepared.sql, args).fetchall()
        else:
            records = self._raw.execute(prepared.sql, args).fetchall()
        # sqlite3 hands back tuples already: copy them only to convert a column.
        return prepared.rows(records) if prepared.converts_results else records

    async def run(
        self, statement: ClauseElement, params: dict[str, Any] | list[dict[str, Any]] | None = None
    ) -> None:
        prepared = self._statements.get(statement)
        observe(prepared.sql)
        with _statement_span(prepared.sql, "sqlite"):
            if isinstance(params, list):
                self._raw.executemany(prepared.sql, [prepared.args(p) for p in params])
            else:
                self._raw.execute(prepared.sql, prepared.args(params or {})).fetchall()

    async def insert_ignore(self, table: Table, rows: list[dict[str, Any]], *, conflict: list[str]) -> None:
        raise Unprepared


def transaction_executor(conn: AsyncConnection, statements: Statements) -> Executor | None:
    """An executor for registered statements inside `conn`'s current transaction, on its own
    driver connection: on the loop while the transaction holds SQLite's write lock, else on
    aiosqlite's thread (one hop per statement). None when there is no such path (not aiosqlite,
    or no transaction begun: SQLAlchemy would begin one on its first statement, the driver would
    autocommit); the caller then uses `conn` itself."""
    writer_state: LoopState | None = getattr(conn, "loop_state", None)
    if (
        writer_state is not None
        and writer_state.write_locked
        and writer_state.raw.in_transaction
        and not conn.adapter._execute_mutex.locked()  # type: ignore[attr-defined]
    ):
        # The writer connection (sqlite_writer.py): its transaction is begun on the driver. One
        # executor (and cursor) per connection and statement set, made once.
        executor: LoopExecutor | None = conn.loop_executor  # type: ignore[attr-defined]
        if executor is None or executor._statements is not statements:
            executor = conn.loop_executor = LoopExecutor(writer_state.raw, statements)  # type: ignore[attr-defined]
        return executor
    sync = conn.sync_connection
    if sync is None:
        return None
    pooled = sync.connection
    driver = pooled.driver_connection
    if not hasattr(driver, "execute_fetchall"):
        return None
    state = loop_state(driver)
    if (
        state is not None
        and state.write_locked
        and not pooled.dbapi_connection._execute_mutex.locked()  # type: ignore[union-attr]
        and state.raw.in_transaction
    ):
        # Also when SQLAlchemy has not begun its transaction: the writer connection's transaction
        # is begun on the driver (sqlite_writer.py, ADR 0064).
        return LoopExecutor(state.raw, statements)
    if not sync.in_transaction():
        return None
    return DriverExecutor(driver, statements, postgresql=False)
