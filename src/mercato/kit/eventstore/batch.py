"""Many streams at once: load the latest state of a batch's streams, append to all of them.

A consumer pass that touches N aggregates cost 5–7 statements per aggregate on PostgreSQL through
`EventStore` one stream at a time (the latest snapshot, the events after it, the append lock, the
version read, SAVEPOINT, INSERT, RELEASE). Here the whole batch is two statements (ADR 0073):

1. `load_streams`: every stream's latest snapshot and the events after it, in one SELECT; with
   `lock_for_append` the same statement takes the event store's append lock (the advisory lock
   that keeps the log growing in commit order, see `store.py`). The rows it reads come from the
   snapshot the statement started with, which may predate a concurrent appender's commit if it
   had to wait for the lock: stale rows are caught by step 2's check, never written over.
2. `append_streams`: every stream's new events in one INSERT … SELECT over arrays whose rows exist
   only where the stream is still at its expected version (checked against the statement's own,
   current snapshot: the lock is held, so no lock-taking appender can commit in between). A stream
   that moved on is reported as a conflict, with nothing of it written; the other streams' events
   are in. The caller reloads the conflicting streams (under the lock, so the reload is current)
   and decides again: optimistic concurrency per stream, as `EventStore.append`'s.

The unique (stream_id, version) constraint stays the backstop against a writer that did not take
the lock: it fails the statement, and the caller's transaction with it (no savepoint: that would be
two more round trips on every batch for a case no writer of this code base produces).

On SQLite (one writer, its write lock held for the whole transaction) both go stream by stream
through `EventStore`, whose one-statement append is SQLite's fast path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ARRAY, BigInteger, Integer, String, Text, bindparam, text
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.eventstore.store import (
    _APPEND_LOCK_KEY,
    ConcurrencyConflict,
    EventStore,
    NewEvent,
    RecordedEvent,
    Snapshot,
)
from mercato.kit.storage import UTCDateTime
from mercato.kit.storage.statements import driver_prepared
from mercato.kit.storage.statements_in_tx import on_connection
from mercato.kit.storage.types import json_text

__all__ = ["AppendOutcome", "StreamAppend", "StreamState", "append_streams", "load_streams"]


@dataclass(frozen=True, slots=True)
class StreamState:
    """A stream as loading needs it: its latest snapshot (if any) and the events after it."""

    snapshot: Snapshot | None
    events: list[RecordedEvent] = field(default_factory=list)

    @property
    def version(self) -> int:
        if self.events:
            return self.events[-1].version
        return self.snapshot.version if self.snapshot is not None else 0


@dataclass(frozen=True, slots=True)
class StreamAppend:
    stream_id: str
    events: Sequence[NewEvent]
    expected_version: int


@dataclass(frozen=True, slots=True)
class AppendOutcome:
    """What `append_streams` wrote per stream, and the streams it did not write (not at their
    expected version: reload and decide again)."""

    recorded: dict[str, list[RecordedEvent]]
    conflicts: set[str]


_STREAM_IDS = bindparam("stream_ids", type_=ARRAY(String))

# kind 0: a stream's latest snapshot (its state in `body`); kind 1: an event after it.
_LOAD_SQL = """
WITH latest AS (
    SELECT DISTINCT ON (stream_id) stream_id, version, state, recorded_at
    FROM eventstore_snapshots
    WHERE stream_id = ANY(:stream_ids)
    ORDER BY stream_id, version DESC
)
SELECT 0 AS kind, stream_id, version, NULL AS type, CAST(state AS TEXT) AS body,
       NULL AS meta, NULL AS position, recorded_at
FROM latest
UNION ALL
SELECT 1, e.stream_id, e.version, e.type, CAST(e.data AS TEXT), CAST(e.metadata AS TEXT),
       e.position, e.recorded_at
FROM eventstore_events AS e LEFT OUTER JOIN latest ON latest.stream_id = e.stream_id
WHERE e.stream_id = ANY(:stream_ids) AND e.version > COALESCE(latest.version, 0)
"""
_LOCK_ARM = """
UNION ALL
SELECT 2, NULL, NULL, NULL, CAST(pg_advisory_xact_lock(:lock_key) AS TEXT), NULL, NULL, NULL
"""
_ORDER = "ORDER BY 1, 2, 3"


def _load_statement(*, lock: bool) -> Any:
    sql = _LOAD_SQL + (_LOCK_ARM if lock else "") + _ORDER
    statement = text(sql).bindparams(_STREAM_IDS)
    if lock:
        statement = statement.bindparams(bindparam("lock_key", type_=BigInteger))
    return driver_prepared(statement)


_LOAD = _load_statement(lock=False)
_LOAD_LOCKED = _load_statement(lock=True)

_LOCK = driver_prepared(
    text("SELECT pg_advisory_xact_lock(:lock_key)").bindparams(bindparam("lock_key", type_=BigInteger))
)

_APPEND = driver_prepared(
    text(
        """
INSERT INTO eventstore_events (stream_id, version, type, data, metadata, recorded_at)
SELECT n.stream_id, n.version, n.type, CAST(n.data AS JSON), CAST(n.metadata AS JSON), :recorded_at
FROM unnest(
    CAST(:stream_ids AS VARCHAR[]), CAST(:versions AS INTEGER[]), CAST(:types AS VARCHAR[]),
    CAST(:datas AS TEXT[]), CAST(:metadatas AS TEXT[]), CAST(:expected AS INTEGER[])
)
     WITH ORDINALITY AS n(stream_id, version, type, data, metadata, expected, ord)
WHERE COALESCE(
    (SELECT max(e.version) FROM eventstore_events AS e WHERE e.stream_id = n.stream_id), 0
) = n.expected
ORDER BY n.ord
RETURNING position, stream_id, version
"""
    ).bindparams(
        _STREAM_IDS,
        bindparam("versions", type_=ARRAY(Integer)),
        bindparam("types", type_=ARRAY(String)),
        bindparam("datas", type_=ARRAY(Text)),
        bindparam("metadatas", type_=ARRAY(Text)),
        bindparam("expected", type_=ARRAY(Integer)),
        bindparam("recorded_at", type_=UTCDateTime),
    )
)


async def load_streams(
    store: EventStore, conn: AsyncConnection, stream_ids: Iterable[str], *, lock_for_append: bool = False
) -> dict[str, StreamState]:
    """Each stream's latest snapshot and the events after it (a stream with neither: an empty
    state). On PostgreSQL one statement, which with `lock_for_append` also takes the append lock
    for the rest of the transaction (pass `locked=True` to `append_streams` then)."""
    ids = list(dict.fromkeys(stream_ids))
    if not ids:
        return {}
    if conn.dialect.name != "postgresql":
        return {stream_id: await _load_one(store, conn, stream_id) for stream_id in ids}
    params: dict[str, Any] = {"stream_ids": ids}
    if lock_for_append:
        params["lock_key"] = _APPEND_LOCK_KEY
    rows = await on_connection(conn).rows(_LOAD_LOCKED if lock_for_append else _LOAD, params)
    snapshots: dict[str, Snapshot] = {}
    events: dict[str, list[RecordedEvent]] = {}
    for kind, stream_id, version, type_, body, meta, position, recorded_at in rows:
        if kind == 0:
            snapshots[stream_id] = Snapshot(stream_id, int(version), json.loads(body), recorded_at)
        elif kind == 1:
            events.setdefault(stream_id, []).append(
                RecordedEvent(
                    position=int(position),
                    stream_id=stream_id,
                    version=int(version),
                    type=str(type_),
                    data=json.loads(body),
                    metadata=json.loads(meta),
                    recorded_at=recorded_at,
                )
            )
    return {stream_id: StreamState(snapshots.get(stream_id), events.get(stream_id, [])) for stream_id in ids}


async def _load_one(store: EventStore, conn: AsyncConnection, stream_id: str) -> StreamState:
    snapshot = await store.latest_snapshot(conn, stream_id)
    after = snapshot.version if snapshot is not None else 0
    return StreamState(snapshot, await store.load(conn, stream_id, after_version=after))


async def append_streams(
    store: EventStore,
    conn: AsyncConnection,
    appends: Sequence[StreamAppend],
    *,
    now: datetime,
    locked: bool = False,
) -> AppendOutcome:
    """Append each stream's events at its expected version; a stream elsewhere is a conflict
    (nothing of it written), the others commit with the caller's transaction.

    On PostgreSQL one statement, under the append lock: `locked` says `load_streams` took it in
    this transaction already, else it is taken first (one more round trip)."""
    for append in appends:
        if append.expected_version < 0:
            raise ValueError("expected_version must be >= 0")
    appends = [a for a in appends if a.events]
    if len({a.stream_id for a in appends}) != len(appends):
        raise ValueError("one StreamAppend per stream")
    if not appends:
        return AppendOutcome({}, set())
    if conn.dialect.name != "postgresql":
        return await _append_one_by_one(store, conn, appends)
    executor = on_connection(conn)
    if not locked:
        await executor.run(_LOCK, {"lock_key": _APPEND_LOCK_KEY})
    columns: dict[str, list[Any]] = {
        "stream_ids": [],
        "versions": [],
        "types": [],
        "datas": [],
        "metadatas": [],
        "expected": [],
    }
    for append in appends:
        for offset, event in enumerate(append.events, start=1):
            columns["stream_ids"].append(append.stream_id)
            columns["versions"].append(append.expected_version + offset)
            columns["types"].append(event.type)
            columns["datas"].append(json_text(dict(event.data)))
            columns["metadatas"].append(json_text(dict(event.metadata)))
            columns["expected"].append(append.expected_version)
    rows = await executor.rows(_APPEND, {**columns, "recorded_at": now})
    positions = {(str(stream_id), int(version)): int(position) for position, stream_id, version in rows}
    recorded: dict[str, list[RecordedEvent]] = {}
    conflicts: set[str] = set()
    for append in appends:
        first = (append.stream_id, append.expected_version + 1)
        if first not in positions:
            conflicts.add(append.stream_id)
            continue
        recorded[append.stream_id] = [
            RecordedEvent(
                position=positions[(append.stream_id, append.expected_version + offset)],
                stream_id=append.stream_id,
                version=append.expected_version + offset,
                type=event.type,
                data=dict(event.data),
                metadata=dict(event.metadata),
                recorded_at=now,
            )
            for offset, event in enumerate(append.events, start=1)
        ]
    return AppendOutcome(recorded, conflicts)


async def _append_one_by_one(
    store: EventStore, conn: AsyncConnection, appends: Sequence[StreamAppend]
) -> AppendOutcome:
    """SQLite: `EventStore.append` per stream (one statement each, atomic on its own)."""
    recorded: dict[str, list[RecordedEvent]] = {}
    conflicts: set[str] = set()
    for append in appends:
        try:
            recorded[append.stream_id] = await store.append(
                conn, append.stream_id, append.events, expected_version=append.expected_version
            )
        except ConcurrencyConflict:
            conflicts.add(append.stream_id)
    return AppendOutcome(recorded, conflicts)
