"""The raw-driver statement layer inside a SQLAlchemy transaction: `on_connection(conn)`.

Part of `kit/storage/statements.py` (the one place that decides how a statement runs), kept apart
for its size: registered statements (`driver_prepared`) sent on the driver connection under a
`Database.write()`, `Database.autocommit()` or `Database.read()` connection, inside its transaction.
The saga runner's moves, the outbox, the inbox and the relay join transactions whose other
statements (a saga step's, a consumer handler's) still go through SQLAlchemy.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy import Table, bindparam
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.util import greenlet_spawn

from mercato.kit.storage.statements import (
    _IN_TURN,
    _IN_TURN_ROWS,
    Statements,
    _statement_span,
    driver_prepared,
    observe,
)

__all__ = ["DRIVER_STATEMENTS_IN_TX", "ConnectionExecutor", "on_connection", "statements_for"]


# Set in a SQLAlchemy connection's `info` once `on_connection` sent a statement in its current
# transaction: statement counters (tests, the bench probe) count that transaction at its commit or
# rollback like one whose statements went through SQLAlchemy's cursor.
DRIVER_STATEMENTS_IN_TX = "mercato_driver_statements_in_tx"

_BY_DIALECT: weakref.WeakKeyDictionary[Dialect, Statements] = weakref.WeakKeyDictionary()


def statements_for(dialect: Dialect) -> Statements:
    """The compiled forms of the registered statements for one engine's dialect, shared process-wide."""
    statements = _BY_DIALECT.get(dialect)
    if statements is None:
        statements = _BY_DIALECT[dialect] = Statements(dialect)
    return statements


class ConnectionExecutor:
    """Registered statements inside a SQLAlchemy connection's transaction, sent on the driver
    connection under it: one asyncpg round trip or aiosqlite thread hop each, no compilation, no
    cursor adaptation. Its statements and the connection's own commit or roll back together.

    asyncpg under SQLAlchemy begins lazily, at the first statement: the first one sent here begins
    the transaction through SQLAlchemy's adapter (unless the connection is in autocommit), so a later
    SQLAlchemy statement finds it begun. A driver error is raised as SQLAlchemy would raise it (a
    `DBAPIError`, the connection invalidated on a disconnect), so callers and the outage mapping
    see one kind of error whichever path sent the statement."""

    def __init__(self, conn: AsyncConnection) -> None:
        sync = conn.sync_connection
        if sync is None:
            raise RuntimeError("on_connection needs a started connection")
        pooled = sync.connection
        self._sync = sync
        self._adapter: Any = pooled.dbapi_connection
        self._driver: Any = pooled.driver_connection
        self._postgresql = sync.dialect.name == "postgresql"
        self._system = "postgresql" if self._postgresql else "sqlite"
        self._statements = statements_for(sync.dialect)

    async def _begin(self) -> None:
        self._sync.info[DRIVER_STATEMENTS_IN_TX] = True
        adapter = self._adapter
        if self._postgresql and adapter._transaction is None and adapter.isolation_level != "autocommit":
            async with adapter._execute_mutex:
                if adapter._transaction is None:
                    await adapter._start_transaction()

    async def rows(
        self, statement: ClauseElement, params: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        parts = None if self._postgresql else _IN_TURN.get(id(statement))
        if parts is not None:
            return await self._in_turn(parts, params or {}, _IN_TURN_ROWS.get(id(statement), 0))
        return await self._rows(statement, params)

    async def _in_turn(
        self, parts: tuple[ClauseElement, ...], params: dict[str, Any], rows_from: int = 0
    ) -> list[tuple[Any, ...]]:
        """Each part in turn, stopping after a RETURNING that returned nothing; the rows of the part
        at `rows_from` (none when it stopped before that part)."""
        wanted: list[tuple[Any, ...]] = []
        for index, part in enumerate(parts):
            rows = await self._rows(part, params)
            if index == rows_from:
                wanted = rows
            if not rows and self._statements.get(part).results:
                break
        return wanted

    async def _rows(
        self, statement: ClauseElement, params: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        prepared = self._statements.get(statement)
        args = prepared.args(params or {})
        await self._begin()
        observe(prepared.sql)
        with _statement_span(prepared.sql, self._system):
            try:
                if self._postgresql:
                    records = await self._driver.fetch(prepared.sql, *args)
                else:
                    records = await self._driver.execute_fetchall(prepared.sql, args)
            except Exception as error:
                await greenlet_spawn(self._raise_as_sqlalchemy, error, prepared.sql, args)
                raise
        return prepared.rows(records)

    async def run(
        self, statement: ClauseElement, params: dict[str, Any] | list[dict[str, Any]] | None = None
    ) -> None:
        parts = None if self._postgresql else _IN_TURN.get(id(statement))
        if parts is not None:
            for one in params if isinstance(params, list) else [params or {}]:
                await self._in_turn(parts, one)
            return
        prepared = self._statements.get(statement)
        many = isinstance(params, list)
        args: Any = (
            [prepared.args(p) for p in params] if isinstance(params, list) else prepared.args(params or {})
        )
        await self._begin()
        observe(prepared.sql)
        with _statement_span(prepared.sql, self._system):
            try:
                if many:
                    await self._driver.executemany(prepared.sql, args)
                elif self._postgresql:
                    await self._driver.execute(prepared.sql, *args)
                else:
                    await self._driver.execute_fetchall(prepared.sql, args)
            except Exception as error:
                await greenlet_spawn(self._raise_as_sqlalchemy, error, prepared.sql, args)
                raise

    async def insert_ignore(self, table: Table, rows: list[dict[str, Any]], *, conflict: list[str]) -> None:
        if rows:
            await self.run(_insert_new_statement(table, rows, conflict, None), _numbered(rows))

    async def insert_new(
        self, table: Table, rows: list[dict[str, Any]], *, conflict: list[str], key: str
    ) -> set[Any]:
        """INSERT ... ON CONFLICT DO NOTHING RETURNING `key`, prepared once per batch size."""
        if not rows:
            return set()
        statement = _insert_new_statement(table, rows, conflict, key)
        return {row[0] for row in await self.rows(statement, _numbered(rows))}

    def _raise_as_sqlalchemy(self, error: Exception, sql: str, args: Any) -> None:
        try:
            self._adapter._handle_exception(error)  # the DB-API error SQLAlchemy's adapter raises
        except Exception as translated:  # noqa: BLE001 - re-raised below as SQLAlchemy's DBAPIError
            self._sync._handle_dbapi_exception(translated, sql, args, None, None)


def on_connection(conn: AsyncConnection) -> ConnectionExecutor:
    """Registered statements in `conn`'s transaction on the driver path (see `ConnectionExecutor`)."""
    return ConnectionExecutor(conn)


_INSERT_NEW: dict[tuple[str, tuple[str, ...], int, tuple[str, ...], str | None], ClauseElement] = {}
# Batches up to this size get a prepared statement each; a bigger one is sent as several.
_INSERT_NEW_MAX_ROWS = 256


def _insert_new_statement(
    table: Table, rows: list[dict[str, Any]], conflict: list[str], key: str | None
) -> ClauseElement:
    """INSERT of len(rows) rows ON CONFLICT (conflict) DO NOTHING [RETURNING key], with bind
    parameters named `<column>_<row>`: built and registered once per (table, columns, row count,
    conflict, key). Both dialects spell it alike; each compiles it once (`Statements`)."""
    count = len(rows)
    if count > _INSERT_NEW_MAX_ROWS:
        raise ValueError(f"at most {_INSERT_NEW_MAX_ROWS} rows per statement, not {count}")
    names = tuple(rows[0])
    cache_key = (table.name, names, count, tuple(conflict), key)
    statement = _INSERT_NEW.get(cache_key)
    if statement is None:
        values = [{n: bindparam(f"{n}_{i}", type_=table.c[n].type) for n in names} for i in range(count)]
        built: Any = postgresql.insert(table).values(values).on_conflict_do_nothing(index_elements=conflict)
        if key is not None:
            built = built.returning(table.c[key])
        statement = _INSERT_NEW[cache_key] = driver_prepared(built)
    return statement


def _numbered(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {f"{name}_{i}": value for i, row in enumerate(rows) for name, value in row.items()}
