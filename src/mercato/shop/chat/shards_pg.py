"""The persister's group commit on PostgreSQL, on the driver path (kit/storage/statements.py).

Since ADR 0077 a pass is one autocommitted call of the `chat_persist_pass` function (migration
0029): one round trip where the transaction below took five. The transaction stays as the
fallback for a database the migration has not reached (the function is then missing).

Through SQLAlchemy, a pass's transaction cost seven round trips (BEGIN, the room locks, the fences,
the dedup lookup, the heads, the insert, COMMIT) and most of its CPU in compiling the `IN (...)`
lists, whose length changes every pass so no compiled form is ever reused. Here the room and id
lists are array parameters of three prepared statements whose text never changes: the shared room
locks; the fences, heads and known (sender, client_msg_id) pairs in one read; and one insert of
`unnest`ed arrays. BEGIN and COMMIT stay SQLAlchemy's (`Database.write`), so the transaction, its
outage mapping and its statement counting are the same as every other write's.

The locks are a statement of their own on purpose: a statement's snapshot is taken when it starts,
so a read in the same statement as the lock wait could miss a fence the mover committed while we
waited (the mover holds the room's lock exclusively while it fences).
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import bindparam, text

from mercato.kit.storage import Database
from mercato.kit.storage.statements import DriverReads, driver_prepared
from mercato.kit.storage.statements_in_tx import on_connection
from mercato.shop.chat.model import ChatMessage

__all__ = ["persist_rooms_pg", "release_pass_connection", "warm_pass_pg"]

# Draft: (sender, text, client_msg_id).
_Draft = tuple[str, str, str]

_LOCK = driver_prepared(
    text(
        "SELECT pg_advisory_xact_lock_shared(k) "
        "FROM (SELECT k FROM unnest(CAST(:keys AS bigint[])) AS k ORDER BY k) AS ordered"
    ).bindparams(bindparam("keys"))
)

# kind 0: a fenced room; 1: a room's head; 2: a message already stored under one of the ids.
_READ = driver_prepared(
    text(
        "SELECT 0, room_id, CAST(0 AS bigint), CAST(NULL AS varchar), CAST(NULL AS text), "
        "CAST(NULL AS varchar), CAST(NULL AS timestamptz) "
        "FROM chat_shard_fences WHERE room_id = ANY(CAST(:rooms AS uuid[])) "
        "UNION ALL "
        # A correlated max per room: one probe of the primary key from its end (with GROUP BY the
        # max visited every message of the rooms, ADR 0091).
        "SELECT 1, r.room_id, (SELECT max(m.seq) FROM chat_messages AS m WHERE m.room_id = r.room_id), "
        "NULL, NULL, NULL, NULL FROM unnest(CAST(:rooms AS uuid[])) AS r (room_id) "
        "UNION ALL "
        "SELECT 2, room_id, seq, sender, text, client_msg_id, sent_at FROM chat_messages "
        "WHERE room_id = ANY(CAST(:rooms AS uuid[])) AND client_msg_id = ANY(CAST(:ids AS varchar[]))"
    ).bindparams(bindparam("rooms"), bindparam("ids"))
)

_INSERT = driver_prepared(
    text(
        "INSERT INTO chat_messages (room_id, seq, sender, text, client_msg_id, sent_at) "
        "SELECT * FROM unnest(CAST(:room_ids AS uuid[]), CAST(:seqs AS bigint[]), "
        "CAST(:senders AS varchar[]), CAST(:texts AS text[]), CAST(:client_ids AS varchar[]), "
        "CAST(:sent AS timestamptz[]))"
    ).bindparams(
        bindparam("room_ids"),
        bindparam("seqs"),
        bindparam("senders"),
        bindparam("texts"),
        bindparam("client_ids"),
        bindparam("sent"),
    )
)


# The whole pass in one statement (ADR 0077): its own transaction, so no BEGIN or COMMIT either.
_PASS = driver_prepared(
    text(
        "SELECT kind, room_id, seq, sender, text, client_msg_id, sent_at FROM chat_persist_pass("
        "CAST(:keys AS bigint[]), CAST(:rooms AS uuid[]), CAST(:senders AS varchar[]), "
        "CAST(:texts AS text[]), CAST(:ids AS varchar[]), CAST(:now AS timestamptz))"
    ).bindparams(
        bindparam("keys"),
        bindparam("rooms"),
        bindparam("senders"),
        bindparam("texts"),
        bindparam("ids"),
        bindparam("now"),
    )
)

# One driver connection per database (a shard is a `Database` of its own), held while the process
# persists (ADR 0090): the pass's statement and its function's plans are prepared on it once.
_READERS: weakref.WeakKeyDictionary[Database, DriverReads] = weakref.WeakKeyDictionary()
# Databases found without the function (migration 0029 not applied): the transaction path, from then on.
_WITHOUT_FUNCTION: weakref.WeakSet[Database] = weakref.WeakSet()


async def persist_rooms_pg(
    db: Database, batches: dict[uuid.UUID, list[_Draft]], room_ids: Sequence[uuid.UUID], now: datetime
) -> tuple[dict[uuid.UUID, list[tuple[ChatMessage, bool]]], list[uuid.UUID]]:
    """`shards._persist_rooms_on` on PostgreSQL: the same locks, checks and rows in one call of
    `chat_persist_pass` (one round trip, autocommitted), or, where the function is missing, in
    three prepared statements inside one `db.write()` transaction."""
    found = await _persist_in_one_call(db, batches, room_ids, now)
    return found if found is not None else await _persist_in_transaction(db, batches, room_ids, now)


def _reader(db: Database) -> DriverReads:
    reader = _READERS.get(db)
    if reader is None:
        reader = _READERS[db] = DriverReads(db, hold=True)
    return reader


async def warm_pass_pg(db: Database, now: datetime) -> None:
    """Prepare the pass on its connection before the first message needs it: an empty call (no
    rooms: it locks, reads and inserts nothing) prepares the statement, introspects its types and
    compiles the function. Cold, the first passes of a process took 30-55 ms instead of 2-3
    (docs/benchmarks.md, Session 18), and every message sent meanwhile waited behind them."""
    empty: list[Any] = []
    await _pass_rows(
        db, {"keys": empty, "rooms": empty, "senders": empty, "texts": empty, "ids": empty, "now": now}
    )


async def _pass_rows(db: Database, params: dict[str, Any]) -> list[Any] | None:
    """One call of the pass on the held connection; None where the function is missing (migration
    0029 not applied), and the transaction path for that database from then on."""
    if db in _WITHOUT_FUNCTION:
        return None
    try:
        return list(await _reader(db).rows(_PASS, params))
    except asyncpg.UndefinedFunctionError:
        _WITHOUT_FUNCTION.add(db)
        return None


async def release_pass_connection(db: Database) -> None:
    """Give the pass's held connection back (the process is closing its databases)."""
    reader = _READERS.pop(db, None)
    if reader is not None:
        await reader.close()


async def _persist_in_one_call(
    db: Database, batches: dict[uuid.UUID, list[_Draft]], room_ids: Sequence[uuid.UUID], now: datetime
) -> tuple[dict[uuid.UUID, list[tuple[ChatMessage, bool]]], list[uuid.UUID]] | None:
    """None: the function is missing here (nothing was written)."""
    from mercato.shop.chat.shards import room_lock_key  # the module that calls this one

    # Every draft in pass order (each room's in stream order): the function numbers them so.
    rooms: list[uuid.UUID] = []
    senders: list[str] = []
    texts: list[str] = []
    ids: list[str] = []
    for room_id in room_ids:
        for sender, text_, client_msg_id in batches[room_id]:
            rooms.append(room_id)
            senders.append(sender)
            texts.append(text_)
            ids.append(client_msg_id)
    rows = await _pass_rows(
        db,
        {
            "keys": sorted(room_lock_key(r) for r in room_ids),
            "rooms": rooms,
            "senders": senders,
            "texts": texts,
            "ids": ids,
            "now": now,
        },
    )
    if rows is None:
        return None
    db.signals.wrote()
    fenced = {row[1] for row in rows if row[0] == 0}
    # (room, sender, client_msg_id) -> its message, and whether this call inserted it.
    found = {
        (row[1], row[3], row[5]): (
            ChatMessage(row[1], int(row[2]), row[3], row[4], row[5], row[6]),
            row[0] == 2,
        )
        for row in rows
        if row[0] != 0
    }
    stored: dict[uuid.UUID, list[tuple[ChatMessage, bool]]] = {}
    for room_id in room_ids:
        if room_id in fenced:
            continue
        results = stored[room_id] = []
        for sender, _text, client_msg_id in batches[room_id]:
            message, new = found[(room_id, sender, client_msg_id)]
            results.append((message, new))
            if new:  # a later draft with the same id in this pass is a duplicate of this one
                found[(room_id, sender, client_msg_id)] = (message, False)
    return stored, sorted(fenced)


async def _persist_in_transaction(
    db: Database, batches: dict[uuid.UUID, list[_Draft]], room_ids: Sequence[uuid.UUID], now: datetime
) -> tuple[dict[uuid.UUID, list[tuple[ChatMessage, bool]]], list[uuid.UUID]]:
    from mercato.shop.chat.shards import assign, room_lock_key  # the module that calls this one

    async with db.write() as conn:
        executor = on_connection(conn)
        await executor.rows(_LOCK, {"keys": sorted(room_lock_key(r) for r in room_ids)})
        ids = sorted({client_msg_id for r in room_ids for _s, _t, client_msg_id in batches[r]})
        rows = await executor.rows(_READ, {"rooms": list(room_ids), "ids": ids})
        fenced = {row[1] for row in rows if row[0] == 0}
        live = [r for r in room_ids if r not in fenced]
        if not live:
            return {}, sorted(fenced)
        heads = {row[1]: int(row[2]) for row in rows if row[0] == 1 and row[2] is not None}
        known = {
            (row[1], row[3], row[5]): ChatMessage(row[1], int(row[2]), row[3], row[4], row[5], row[6])
            for row in rows
            if row[0] == 2
        }
        stored, new = assign(live, batches, known, heads, now)
        if new:
            columns: dict[str, list[Any]] = {
                "room_ids": [m.room_id for m in new],
                "seqs": [m.seq for m in new],
                "senders": [m.sender for m in new],
                "texts": [m.text for m in new],
                "client_ids": [m.client_msg_id for m in new],
                "sent": [m.sent_at for m in new],
            }
            await executor.run(_INSERT, columns)
    return stored, sorted(fenced)
