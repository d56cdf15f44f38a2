"""The event store: append with an expected version, load a stream, read the whole log, snapshots.

Every method takes the caller's connection, so events commit in the same transaction as whatever
else the use case writes (an inbox record, an outbox message) and never without it.

Ordering: on PostgreSQL a sequence hands out positions at insert time but transactions commit in
any order, so a subscriber reading `position > p` could pass a position that commits later and
never see it. Appends therefore take one transaction-scoped advisory lock before inserting: the
log grows in commit order, like the SQL stream log's per-partition head row. SQLite serializes
writers already (`BEGIN IMMEDIATE`).

On SQLite the append is one statement on the driver's connection (`_sqlite_append`): the version
check is a subquery of the INSERT, so check and insert are one statement, where SQLAlchemy's
adapter took ~15 thread hops (read, savepoint, insert, release: cursor, execute, fetch and close
each; ADR 0058). Inside a transaction holding the write lock it runs on the loop's own thread, no
hop at all (ADR 0062). One statement is atomic on its own (a failing INSERT undoes only itself), so it needs
no savepoint to keep the caller's transaction usable. In `Database.write()` that transaction is the
SQLite writer connection's, begun on the driver, so an append alone never builds a SQLAlchemy
transaction; a one-event append reads its position from the rowid instead of RETURNING (ADR 0064)
and is a VALUES row whose version is NULL when the check fails (a NOT NULL failure, no rows
written): `INSERT … SELECT` from the table it inserts into costs SQLite a temporary table (ADR 0069).
"""

from __future__ import annotations

import sqlite3
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any, NoReturn

from sqlalchemy import (
    Insert,
    Integer,
    String,
    bindparam,
    case,
    func,
    literal_column,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, RowMapping
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.eventstore.tables import events, snapshots
from mercato.kit.storage import UTCDateTime
from mercato.kit.storage.sqlite_loop_statements import LoopExecutor, transaction_executor
from mercato.kit.storage.statements import Executor, Statements, driver_prepared
from mercato.kit.storage.types import json_text

__all__ = ["ConcurrencyConflict", "EventStore", "NewEvent", "RecordedEvent", "Snapshot"]

# Any fixed 64-bit key: only the event store takes it. (crc32 of "mercato.eventstore.append".)
_APPEND_LOCK_KEY = 0x2D5F_4E17
_UNIQUE_NAMES = ("uq_eventstore_events_stream_id_version", "eventstore_events.stream_id")


class ConcurrencyConflict(Exception):
    """Another writer appended to the stream since the caller read it: reload, decide again, retry."""

    def __init__(self, stream_id: str, *, expected_version: int, actual_version: int | None) -> None:
        found = "a concurrent append" if actual_version is None else f"version {actual_version}"
        super().__init__(f"stream {stream_id!r}: expected version {expected_version}, found {found}")
        self.stream_id = stream_id
        self.expected_version = expected_version
        self.actual_version = actual_version


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: its `type`, JSON-serializable `data`, and `metadata` (causation, ...)."""

    type: str
    data: Mapping[str, Any]
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    position: int
    stream_id: str
    version: int
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class Snapshot:
    stream_id: str
    version: int
    state: dict[str, Any]
    recorded_at: datetime


class EventStore:
    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()

    async def append(
        self, conn: AsyncConnection, stream_id: str, new_events: Sequence[NewEvent], *, expected_version: int
    ) -> list[RecordedEvent]:
        """Append `new_events` as versions `expected_version + 1 ...` of `stream_id`.

        `expected_version` is the version the caller's decision was based on (0: a new stream).
        Raises `ConcurrencyConflict` when the stream is at another version; the caller's
        transaction stays usable (a failed append writes none of its events: one statement on
        SQLite, a savepoint on PostgreSQL), so it can reload and retry.
        """
        if expected_version < 0:
            raise ValueError("expected_version must be >= 0")
        if not new_events:
            return []
        dialect = conn.dialect
        if dialect.name == "sqlite":
            executor = transaction_executor(conn, _statements(dialect))
            if executor is not None:
                if len(new_events) == 1 and isinstance(executor, LoopExecutor):
                    # The common case (one event, the write lock held): no coroutine below this one.
                    recorded = self._append_one_on_loop(executor, stream_id, new_events[0], expected_version)
                    if recorded is not None:
                        return [recorded]
                    await _raise_conflict(executor, stream_id, expected_version)
                return await self._sqlite_append(executor, stream_id, new_events, expected_version)
        if dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _APPEND_LOCK_KEY})
        # Under the lock (or SQLite's write lock) this read is current, so a stale writer is told
        # the version it missed; the unique constraint still guards anyone not taking the lock.
        actual = await self.stream_version(conn, stream_id)
        if actual != expected_version:
            raise ConcurrencyConflict(stream_id, expected_version=expected_version, actual_version=actual)
        now = self._clock.now()
        rows: list[dict[str, Any]] = [
            {
                "stream_id": stream_id,
                "version": expected_version + offset,
                "type": event.type,
                "data": dict(event.data),
                "metadata": dict(event.metadata),
                "recorded_at": now,
            }
            for offset, event in enumerate(new_events, start=1)
        ]
        try:
            async with conn.begin_nested():
                result = await conn.execute(
                    events.insert().returning(events.c.position, sort_by_parameter_order=True), rows
                )
                positions = [int(row[0]) for row in result]
        except IntegrityError as exc:
            if not any(name in str(exc.orig) for name in _UNIQUE_NAMES):
                raise
            raise ConcurrencyConflict(
                stream_id, expected_version=expected_version, actual_version=None
            ) from exc
        return [
            RecordedEvent(
                position=position,
                stream_id=stream_id,
                version=int(row["version"]),
                type=str(row["type"]),
                data=row["data"],
                metadata=row["metadata"],
                recorded_at=now,
            )
            for position, row in zip(positions, rows, strict=True)
        ]

    async def _sqlite_append(
        self,
        executor: Executor,
        stream_id: str,
        new_events: Sequence[NewEvent],
        expected_version: int,
    ) -> list[RecordedEvent]:
        """Check and insert as one statement on the driver's connection, inside the caller's
        transaction (SQLAlchemy's connection is checked out to it, so nothing else uses the driver
        connection meanwhile): on the loop's thread while the transaction holds the write lock,
        else on aiosqlite's (`transaction_executor`, ADR 0062). Under `BEGIN IMMEDIATE` the
        subquery reads the current version: no other writer can commit between it and the insert;
        the unique constraint stays the backstop for a transaction that did not take the write
        lock up front."""
        now = self._clock.now()
        params: dict[str, Any] = {
            "stream_id": stream_id,
            "expected_version": expected_version,
            "recorded_at": now,
        }
        datas: list[dict[str, Any]] = []
        metadatas: list[dict[str, Any]] = []
        for i, event in enumerate(new_events):
            data, metadata = dict(event.data), dict(event.metadata)
            datas.append(data)
            metadatas.append(metadata)
            keys = _ARM_KEYS[i] if i < len(_ARM_KEYS) else _arm_keys(i)
            params[keys[0]] = expected_version + 1 + i
            params[keys[1]] = event.type
            # Encoded here, as the JSON type would (`json.dumps`'s text), so the statement binds text.
            params[keys[2]] = json_text(data)
            params[keys[3]] = json_text(metadata) if metadata else "{}"
        try:
            inserted = await executor.rows(_checked_insert(len(new_events)), params)
        except sqlite3.Error as exc:
            raise _append_error(exc, stream_id, expected_version) from exc
        if not inserted:
            await _raise_conflict(executor, stream_id, expected_version)
        if len(inserted) != len(new_events):
            # Every arm of the INSERT's SELECT runs before its first row is inserted (SQLite
            # materializes a SELECT that reads the table it inserts into): all or none pass.
            raise RuntimeError(f"stream {stream_id!r}: {len(inserted)} of {len(new_events)} events inserted")
        positions = {int(version): int(position) for position, version in inserted}
        return [
            RecordedEvent(
                position=positions[expected_version + 1 + i],
                stream_id=stream_id,
                version=expected_version + 1 + i,
                type=event.type,
                data=datas[i],
                metadata=metadatas[i],
                recorded_at=now,
            )
            for i, event in enumerate(new_events)
        ]

    def _append_one_on_loop(
        self, executor: LoopExecutor, stream_id: str, event: NewEvent, expected_version: int
    ) -> RecordedEvent | None:
        """`_sqlite_append` of one event on the loop, where the shop and the bench append: the same
        checked INSERT without RETURNING (the position is the rowid, ADR 0064), run without a
        coroutine of its own (ADR 0069). None: the check failed and nothing was written."""
        now = self._clock.now()
        data, metadata = dict(event.data), dict(event.metadata)
        version = expected_version + 1
        params = {
            "stream_id": stream_id,
            "expected_version": expected_version,
            "recorded_at": now,
            "version_0": version,
            "type_0": event.type,
            "data_0": json_text(data),
            "metadata_0": json_text(metadata) if metadata else "{}",
        }
        try:
            position = executor.inserted_rowid(_CHECKED_INSERT_ONE, params)
        except sqlite3.IntegrityError as exc:
            if _is_failed_check(exc):
                return None  # the version was NULL: the stream is not at `expected_version`
            raise _append_error(exc, stream_id, expected_version) from exc
        except sqlite3.Error as exc:
            raise _append_error(exc, stream_id, expected_version) from exc
        if position is None:
            return None
        return RecordedEvent(position, stream_id, version, event.type, data, metadata, now)

    async def stream_version(self, conn: AsyncConnection, stream_id: str) -> int:
        """The version of the stream's last event; 0 for a stream with none."""
        found = await conn.scalar(select(func.max(events.c.version)).where(events.c.stream_id == stream_id))
        return int(found or 0)

    async def load(
        self, conn: AsyncConnection, stream_id: str, *, after_version: int = 0
    ) -> list[RecordedEvent]:
        """The stream's events with a version above `after_version`, in version order."""
        if conn.dialect.name == "sqlite":
            # One statement on the driver's connection (one hop to aiosqlite's thread, where a
            # long stream's read may take its time), its rows as tuples: SQLAlchemy's cursor
            # result took a hop per cursor call and built a `RowMapping` per event (ADR 0076).
            statements = _statements(conn.dialect)
            executor = transaction_executor(conn, statements)
            if executor is None and not conn.in_transaction():
                # A read connection (`Database.read()`): begin as its first statement would
                # (SQLAlchemy's autobegin; a deferred BEGIN, on the loop: it takes no lock).
                await conn.begin()
                executor = transaction_executor(conn, statements)
            if executor is not None:
                found = await executor.rows(_LOAD, {"stream_id": stream_id, "after_version": after_version})
                return [RecordedEvent(*row) for row in found]
        result = await conn.execute(
            select(events)
            .where(events.c.stream_id == stream_id, events.c.version > after_version)
            .order_by(events.c.version)
        )
        return [_recorded(row) for row in result.mappings()]

    async def read_all(
        self, conn: AsyncConnection, *, after_position: int = 0, limit: int = 1000
    ) -> list[RecordedEvent]:
        """Up to `limit` events of every stream after `after_position`, in position (commit) order.

        A subscriber keeps the last position it handled and asks for what follows.
        """
        if limit < 1:
            raise ValueError("limit must be >= 1")
        result = await conn.execute(
            select(events).where(events.c.position > after_position).order_by(events.c.position).limit(limit)
        )
        return [_recorded(row) for row in result.mappings()]

    async def save_snapshot(
        self, conn: AsyncConnection, stream_id: str, *, version: int, state: Mapping[str, Any]
    ) -> None:
        """Record the stream's state folded up to `version`. Saving one version twice keeps the first
        (both are the same fold of the same events)."""
        dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        await conn.execute(
            dialect_insert(snapshots)
            .values(stream_id=stream_id, version=version, state=dict(state), recorded_at=self._clock.now())
            .on_conflict_do_nothing(index_elements=["stream_id", "version"])
        )

    async def latest_snapshot(self, conn: AsyncConnection, stream_id: str) -> Snapshot | None:
        row = (
            (
                await conn.execute(
                    select(snapshots)
                    .where(snapshots.c.stream_id == stream_id)
                    .order_by(snapshots.c.version.desc())
                    .limit(1)
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            return None
        return Snapshot(
            stream_id=str(row["stream_id"]),
            version=int(row["version"]),
            state=dict(row["state"]),
            recorded_at=row["recorded_at"],
        )


_STATEMENTS: weakref.WeakKeyDictionary[Dialect, Statements] = weakref.WeakKeyDictionary()


def _statements(dialect: Dialect) -> Statements:
    if dialect is _last[0]:
        last: Statements = _last[1]
        return last
    statements = _STATEMENTS.get(dialect)
    if statements is None:
        statements = _STATEMENTS[dialect] = Statements(dialect)
    _last[:] = [dialect, statements]  # the one engine of a process, most of the time
    return statements


_last: list[Any] = [None, None]


def _append_error(exc: sqlite3.Error, stream_id: str, expected_version: int) -> Exception:
    """What a failed SQLite append raises: a concurrency conflict for the unique (stream, version)
    constraint, else what SQLAlchemy raises for the driver's error on its own path, so callers
    catch one type whichever path ran."""
    if isinstance(exc, sqlite3.IntegrityError):
        if any(name in str(exc) for name in _UNIQUE_NAMES):
            return ConcurrencyConflict(stream_id, expected_version=expected_version, actual_version=None)
        return IntegrityError("INSERT INTO eventstore_events", None, exc)
    # "database is locked": OperationalError, as SQLAlchemy raises it.
    return DBAPIError.instance("INSERT INTO eventstore_events", (), exc, sqlite3.Error)


async def _raise_conflict(executor: Executor, stream_id: str, expected_version: int) -> NoReturn:
    """The checked INSERT wrote nothing: tell the caller the version it missed (the cold path)."""
    found = await executor.rows(_CURRENT_VERSION, {"stream_id": stream_id})
    raise ConcurrencyConflict(stream_id, expected_version=expected_version, actual_version=int(found[0][0]))


def _arm_keys(i: int) -> tuple[str, str, str, str]:
    return (f"version_{i}", f"type_{i}", f"data_{i}", f"metadata_{i}")


# The bind parameter names of the first arms, made once rather than per append.
_ARM_KEYS = tuple(_arm_keys(i) for i in range(16))


def _current_version_of(stream_id: Any) -> Any:
    return (
        select(func.coalesce(func.max(events.c.version), literal_column("0")))
        .where(events.c.stream_id == stream_id)
        .scalar_subquery()
    )


_CURRENT_VERSION = driver_prepared(
    select(_current_version_of(bindparam("stream_id", type_=String)).label("version"))
)


@cache
def _checked_insert(count: int) -> Insert:
    """INSERT of `count` events of one stream whose rows exist only if the stream is still at
    `expected_version`; RETURNING (position, version) of each. One statement per batch size,
    registered for the driver path once (an application appends a handful of sizes)."""
    stream_id = bindparam("stream_id", type_=String)
    arms = [
        select(
            stream_id,
            bindparam(f"version_{i}", type_=Integer),
            bindparam(f"type_{i}", type_=String),
            # JSON text, encoded by the caller (`_sqlite_append`): the column's JSON type would
            # encode it the same way, through one more call per value.
            bindparam(f"data_{i}", type_=String),
            bindparam(f"metadata_{i}", type_=String),
            bindparam("recorded_at", type_=UTCDateTime),
        ).where(_current_version_of(stream_id) == bindparam("expected_version", type_=Integer))
        for i in range(count)
    ]
    source = arms[0] if count == 1 else union_all(*arms)
    columns = ["stream_id", "version", "type", "data", "metadata", "recorded_at"]
    return driver_prepared(
        events.insert().from_select(columns, source).returning(events.c.position, events.c.version)
    )


def _checked_insert_one() -> Insert:
    """INSERT of one event whose version is NULL unless the stream is at `expected_version`: the
    NOT NULL constraint then fails the statement and nothing is written (`_is_failed_check`), as
    `_checked_insert`'s empty SELECT writes nothing. A VALUES row, not `INSERT … SELECT`: a
    SELECT that reads the table it inserts into goes through a temporary table (SQLite's
    OpenEphemeral), ~27,000 of the ~83,000 CPU instructions SQLite spent on a one-event append
    (callgrind, ADR 0069). The position is the statement's rowid (`LoopExecutor.inserted_rowid`)."""
    stream_id = bindparam("stream_id", type_=String)
    checked_version = case(
        (
            _current_version_of(stream_id) == bindparam("expected_version", type_=Integer),
            bindparam("version_0", type_=Integer),
        ),
        else_=None,
    )
    return driver_prepared(
        events.insert().values(
            stream_id=stream_id,
            version=checked_version,
            type=bindparam("type_0", type_=String),
            data=bindparam("data_0", type_=String),
            metadata=bindparam("metadata_0", type_=String),
            recorded_at=bindparam("recorded_at", type_=UTCDateTime),
        )
    )


_CHECKED_INSERT_ONE = _checked_insert_one()


def _is_failed_check(exc: sqlite3.IntegrityError) -> bool:
    """`_CHECKED_INSERT_ONE`'s version check failed (its version was NULL)."""
    return getattr(
        exc, "sqlite_errorcode", None
    ) == sqlite3.SQLITE_CONSTRAINT_NOTNULL and "eventstore_events.version" in str(exc)


# `load` on SQLite's driver path: the columns in `RecordedEvent`'s order, converted as SQLAlchemy
# would (JSON text to dicts, the UTC text to an aware datetime).
_LOAD = driver_prepared(
    select(
        events.c.position,
        events.c.stream_id,
        events.c.version,
        events.c.type,
        events.c.data,
        events.c.metadata,
        events.c.recorded_at,
    )
    .where(
        events.c.stream_id == bindparam("stream_id", type_=String),
        events.c.version > bindparam("after_version", type_=Integer),
    )
    .order_by(events.c.version)
)


def _recorded(row: RowMapping) -> RecordedEvent:
    return RecordedEvent(
        position=int(row["position"]),
        stream_id=str(row["stream_id"]),
        version=int(row["version"]),
        type=str(row["type"]),
        data=dict(row["data"]),
        metadata=dict(row["metadata"]),
        recorded_at=row["recorded_at"],
    )
