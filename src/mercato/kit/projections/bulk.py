"""A projection's batch read and written in one statement per table, whatever its size.

A projector's pass applies up to a few hundred messages; written row by row (or as an executemany,
one round trip on asyncpg but still one execution per row on the server) the read model costs the
database a statement per touched row. Here:

- PostgreSQL: one array per column, `unnest`ed (a read: `= ANY(<array>)`): ONE prepared statement
  per table on the raw driver, whatever the row count, so the driver's statement cache holds one
  entry, not one per batch size;
- SQLite: a multi-row `VALUES` (a read: an `IN` list) through SQLAlchemy, whose compiled cache keeps
  one form per row count (in-process: no round trip and no server-side prepare to save).

The SQL is decided here from the connection's engine, so the projections that call it never branch
on it. Rows of one upsert must have distinct keys (ON CONFLICT cannot touch a row twice).
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Table, any_, bindparam, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement

from mercato.kit.storage.statements import driver_prepared
from mercato.kit.storage.statements_in_tx import on_connection

__all__ = ["rows_by_key", "upsert_rows"]

# (table name, key, increments) -> the PostgreSQL statement, built once.
_PG_UPSERTS: dict[tuple[str, tuple[str, ...], tuple[str, ...]], ClauseElement] = {}
_PG_READS: dict[tuple[str, str], tuple[ClauseElement, Any]] = {}


def _array_type(table: Table, column: str, dialect: Dialect) -> str:
    """The element type the column's array is sent as: JSON travels as text (the column's bind
    processor serializes it) and is cast back per row."""
    compiled = table.c[column].type.compile(dialect=dialect)
    return "text" if compiled.upper() in ("JSON", "JSONB") else compiled


def _pg_upsert(
    table: Table, columns: tuple[str, ...], key: tuple[str, ...], add: tuple[str, ...], dialect: Dialect
) -> ClauseElement:
    cache_key = (table.name, key, add)
    statement = _PG_UPSERTS.get(cache_key)
    if statement is None:
        quote = dialect.identifier_preparer.quote
        arrays = ", ".join(f"CAST(:{c} AS {_array_type(table, c, dialect)}[])" for c in columns)
        picked = ", ".join(
            f"CAST(u.{quote(c)} AS {table.c[c].type.compile(dialect=dialect)})" for c in columns
        )
        names = ", ".join(quote(c) for c in columns)
        updates = ", ".join(
            f"{quote(c)} = {quote(table.name)}.{quote(c)} + excluded.{quote(c)}"
            if c in add
            else f"{quote(c)} = excluded.{quote(c)}"
            for c in columns
            if c not in key
        )
        statement = _PG_UPSERTS[cache_key] = driver_prepared(
            # Identifiers only, quoted by the dialect; every value is a bound array.
            text(
                f"INSERT INTO {quote(table.name)} ({names}) "  # noqa: S608
                f"SELECT {picked} FROM unnest({arrays}) AS u({names}) "
                f"ON CONFLICT ({', '.join(quote(c) for c in key)}) DO UPDATE SET {updates}"
            )
        )
    return statement


async def upsert_rows(
    conn: AsyncConnection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    key: Sequence[str],
    add: Sequence[str] = (),
) -> None:
    """Insert `rows` (same columns each, distinct keys) in one statement; a row whose key exists
    updates it instead: each column set to the new value, or, for the columns in `add`, increased
    by it."""
    if not rows:
        return
    columns = tuple(rows[0])
    dialect = conn.dialect
    if dialect.name == "postgresql":
        statement = _pg_upsert(table, columns, tuple(key), tuple(add), dialect)
        params: dict[str, Any] = {}
        for column in columns:
            process = table.c[column].type.dialect_impl(dialect).bind_processor(dialect)
            values = [row[column] for row in rows]
            params[column] = values if process is None else [process(v) for v in values]
        await on_connection(conn).run(statement, params)
        return
    insert = sqlite.insert(table).values(list(rows))
    await conn.execute(
        insert.on_conflict_do_update(
            index_elements=list(key),
            set_={
                c: (table.c[c] + insert.excluded[c]) if c in add else insert.excluded[c]
                for c in columns
                if c not in key
            },
        )
    )


async def rows_by_key(conn: AsyncConnection, table: Table, key: str, values: Sequence[Any]) -> list[Any]:
    """The rows of `table` whose `key` column is one of `values`, in one statement; each row's
    columns readable as attributes (`row.<column>`), as SQLAlchemy's rows are."""
    if not values:
        return []
    if conn.dialect.name != "postgresql":
        return list(await conn.execute(select(table).where(table.c[key].in_(list(values)))))
    found = _PG_READS.get((table.name, key))
    if found is None:
        column = table.c[key]
        read: ClauseElement = driver_prepared(
            select(table).where(column == any_(bindparam("keys", type_=postgresql.ARRAY(column.type))))
        )
        # Attribute access by column name, as on SQLAlchemy's rows (`summary_from_row` reads both).
        row_type: Any = namedtuple(f"{table.name}_row", table.c.keys())  # type: ignore[misc]
        found = _PG_READS[(table.name, key)] = (read, row_type)
    statement, make_row = found
    records = await on_connection(conn).rows(statement, {"keys": list(values)})
    return [make_row(*record) for record in records]
