"""ADR 0091: a persist pass reads each room's head with one probe of the primary key from its end.

`max(seq) ... GROUP BY room_id` visited every message of the pass's rooms (PostgreSQL's min/max
rewrite skips grouped aggregates, and SQLite's as well), so a pass's cost grew with its rooms'
history. Every path now asks each room's `max(seq)` on its own: the `chat_persist_pass` function
(migration 0033), the transaction it falls back to where the function is missing, and the
transaction SQLite runs."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from mercato.bootstrap import Container
from mercato.shop.chat import shards_pg
from mercato.shop.chat.shards import room_lock_key

_EXPLAIN_PASS = text(
    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM chat_persist_pass("
    "CAST(:keys AS bigint[]), CAST(:rooms AS uuid[]), CAST(:senders AS varchar[]), "
    "CAST(:texts AS text[]), CAST(:ids AS varchar[]), now())"
)


async def _rooms(container: Container, *names: str) -> list[uuid.UUID]:
    user = str(uuid.uuid4())
    return [(await container.chat.create_room(name, [user], created_by=user)).id for name in names]


async def test_a_pass_reads_as_many_buffers_for_a_long_room_as_for_a_new_one(container: Container) -> None:
    if container.db.dialect != "postgresql":
        pytest.skip("the pass's function and its buffer counts are PostgreSQL's")
    long_room, new_room = await _rooms(container, "long", "new")
    await container.chat.persist_rooms({long_room: [("u", f"m{i}", f"old-{i}") for i in range(5000)]})

    async def buffers(room: uuid.UUID, client_msg_id: str) -> int:
        params: dict[str, Any] = {
            "keys": [room_lock_key(room)],
            "rooms": [room],
            "senders": ["u"],
            "texts": ["hello"],
            "ids": [client_msg_id],
        }
        async with container.db.engine.connect() as conn:
            raw = (await conn.execute(_EXPLAIN_PASS, params)).scalar_one()
            await conn.commit()
        plan = (orjson.loads(raw) if isinstance(raw, str | bytes) else raw)[0]["Plan"]
        return int(plan["Shared Hit Blocks"]) + int(plan["Shared Read Blocks"])

    await buffers(new_room, "warm-up")  # the function's plans are made on a first call
    await buffers(long_room, "warm-up")
    for attempt in range(3):
        new, long_ = await buffers(new_room, f"n{attempt}"), await buffers(long_room, f"l{attempt}")
        # Grouped, the head of the 5,000-message room read its ~70 heap pages and their index.
        assert long_ - new < 20, (new, long_)
    history = await container.chat.history(long_room, after=5000, limit=10)
    assert [m.seq for m in history] == [5001, 5002, 5003, 5004]  # numbered after the head it read


async def test_every_path_numbers_a_pass_after_each_rooms_head(container: Container) -> None:
    """The function, its fallback transaction (PostgreSQL) and SQLite's transaction: a room with
    history continues after its head, a room without any starts at 1."""
    db, now = container.db, container.clock.now()
    paths: list[str] = ["service"]
    if db.dialect == "postgresql":
        paths += ["function", "transaction"]
    for path in paths:
        busy, empty = await _rooms(container, f"busy-{path}", f"empty-{path}")
        await container.chat.persist_rooms({busy: [("u", "old", f"{path}-{i}") for i in range(3)]})
        batches = {busy: [("u", "a", f"{path}-a"), ("v", "b", f"{path}-b")], empty: [("u", "c", f"{path}-c")]}
        if path == "service":
            stored = await container.chat.persist_rooms(batches)
        else:
            persist = (
                shards_pg._persist_in_one_call if path == "function" else shards_pg._persist_in_transaction
            )
            found = await persist(db, batches, sorted(batches), now)
            assert found is not None
            stored, fenced = found
            assert fenced == []
        assert [(m.seq, new) for m, new in stored[busy]] == [(4, True), (5, True)], path
        assert [(m.seq, new) for m, new in stored[empty]] == [(1, True)], path
