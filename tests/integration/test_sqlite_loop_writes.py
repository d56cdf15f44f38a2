"""SQLite write transactions on the event loop's thread while the write lock is free (ADR 0062).

Uncontended, an event-store append in `Database.write()` makes no hop to aiosqlite's thread at
NORMAL (BEGIN IMMEDIATE, the append and COMMIT on the loop) and one at FULL (the COMMIT's fsync
stays off the loop). With the write lock held by another connection (another process, as
`mercato api` and `mercato worker` share the file), the append waits on aiosqlite's thread, the
event loop keeps turning, and the append lands once the lock is released.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.sql import ClauseElement

from mercato.bootstrap import Container
from mercato.kit.eventstore import EventStore, NewEvent, events, snapshots
from mercato.kit.ids import new_id
from mercato.kit.messaging import Message
from mercato.kit.storage import Database, create_database, metadata
from mercato.kit.storage.sqlite_loop import THREAD_COMMIT_EVERY, LoopState, loop_state
from mercato.kit.storage.sqlite_loop_statements import LoopExecutor
from mercato.shop.payments.contracts import PAYMENT_AUTHORIZED, PAYMENTS_TOPIC


async def _database(path: Path, synchronous: str = "NORMAL") -> Database:
    db = create_database(f"sqlite+aiosqlite:///{path}", sqlite_synchronous=synchronous, pool_size=1)
    async with db.engine.begin() as conn:
        await conn.run_sync(lambda sync: metadata.create_all(sync, tables=[events, snapshots]))
    return db


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await _database(tmp_path / "loop.db")
    yield database
    await database.dispose()


class _CountingQueue:
    """aiosqlite's request queue, counting each call handed to its thread."""

    def __init__(self, queue: Any) -> None:
        self._queue = queue
        self.puts = 0

    def put_nowait(self, item: Any) -> None:
        self.puts += 1
        self._queue.put_nowait(item)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


async def _driver(db: Database) -> Any:
    async with db.write() as conn:
        assert conn.sync_connection is not None
        return conn.sync_connection.connection.driver_connection


async def _hops_per_append(db: Database, appends: int) -> list[int]:
    """Thread hand-offs of each append (one write transaction each) on the pool's one connection."""
    driver = await _driver(db)
    counting = _CountingQueue(driver._tx)
    driver._tx = counting
    store, stream, hops = EventStore(), f"loop-{uuid.uuid4()}", []
    try:
        for version in range(appends):
            before = counting.puts
            async with db.write() as conn:
                await store.append(conn, stream, [NewEvent("t", {"n": version})], expected_version=version)
            hops.append(counting.puts - before)
    finally:
        driver._tx = counting._queue
    async with db.read() as conn:
        assert [e.version for e in await store.load(conn, stream)] == list(range(1, appends + 1))
    return hops


async def test_an_uncontended_append_at_normal_never_leaves_the_loop(db: Database) -> None:
    hops = await _hops_per_append(db, 10)
    # Before ADR 0062: three per append (BEGIN IMMEDIATE, the append, COMMIT).
    assert hops == [0] * 10


async def test_at_full_only_the_commit_goes_to_the_thread(tmp_path: Path) -> None:
    db = await _database(tmp_path / "full.db", "FULL")
    try:
        assert await _hops_per_append(db, 5) == [1] * 5
    finally:
        await db.dispose()


async def test_one_commit_in_n_goes_to_the_thread_for_the_checkpoint(db: Database) -> None:
    hops = await _hops_per_append(db, 3 * THREAD_COMMIT_EVERY)
    assert 2 <= sum(hops) <= 4, hops
    state = loop_state(await _driver(db))
    assert isinstance(state, LoopState)
    assert state.commits_on_thread >= 2


async def test_the_wal_is_still_checkpointed_when_commits_run_on_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    db = await _database(path)
    store, stream = EventStore(), "wal"
    try:
        # ~4,000 pages of events: without a checkpoint the WAL would pass 16 MB.
        for version in range(400):
            async with db.write() as conn:
                padded = [NewEvent("t", {"pad": "x" * 40_000})]
                await store.append(conn, stream, padded, expected_version=version)
        wal = os.path.getsize(f"{path}-wal")  # noqa: ASYNC240 - a stat, after the writes
        assert wal < 10 * 1024 * 1024, wal
    finally:
        await db.dispose()


class _LoopLag:
    """The longest gap between two turns of a 1 ms ticker: how long the loop was blocked."""

    def __init__(self) -> None:
        self.worst_ms = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.worst_ms = max(self.worst_ms, (now - last) * 1000 - 1)
            last = now

    def __enter__(self) -> _LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_an_append_while_another_connection_holds_the_lock_waits_off_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "locked.db"
    db = await _database(path)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    store = EventStore()
    try:
        await _hops_per_append(db, 1)  # opens the pool's connection, uncontended
        state = loop_state(await _driver(db))
        assert state is not None
        thread_begins = state.begins_on_thread
        other.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
        with _LoopLag() as lag:

            async def append() -> None:
                async with db.write() as conn:
                    await store.append(conn, "locked", [NewEvent("t", {})], expected_version=0)

            task = asyncio.create_task(append())
            await asyncio.sleep(0.3)
            assert not task.done()  # waiting for the lock, on aiosqlite's thread
            other.execute("COMMIT")
            await asyncio.wait_for(task, 5)
        # A wait on the loop would block it until the busy timeout (10 s): this test's own COMMIT
        # of the other connection could not even run. The margin is for a loaded machine.
        assert lag.worst_ms < 200, lag.worst_ms
        assert state.begins_on_thread == thread_begins + 1
        async with db.read() as conn:
            assert [e.version for e in await store.load(conn, "locked")] == [1]
        # The next uncontended one is back on the loop.
        assert await _hops_per_append(db, 1) == [0]
    finally:
        other.close()
        await db.dispose()


async def test_a_failed_write_rolls_back_and_the_next_one_is_on_the_loop(db: Database) -> None:
    store = EventStore()

    async def fail_after_the_append() -> None:
        async with db.write() as conn:
            await store.append(conn, "rolled-back", [NewEvent("t", {})], expected_version=0)
            raise RuntimeError("the use case failed")

    with pytest.raises(RuntimeError):
        await fail_after_the_append()
    async with db.read() as conn:
        assert await store.load(conn, "rolled-back") == []
    state = loop_state(await _driver(db))
    assert state is not None
    assert not state.write_locked
    assert await _hops_per_append(db, 2) == [0, 0]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_payment_ledger_consumer_appends_on_the_loop(
    container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mercato up`'s event store user: the ledger consumer's append, inside the consumer's write
    transaction (with its inbox record), takes the loop path."""
    on_loop: list[str] = []
    rows, inserted_rowid = LoopExecutor.rows, LoopExecutor.inserted_rowid

    async def spy(
        self: LoopExecutor, statement: ClauseElement, params: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        on_loop.append(str(statement).split(" ", 3)[2])
        return await rows(self, statement, params)

    def spy_one(self: LoopExecutor, statement: ClauseElement, params: dict[str, Any]) -> int | None:
        on_loop.append(str(statement).split(" ", 3)[2])
        return inserted_rowid(self, statement, params)

    monkeypatch.setattr(LoopExecutor, "rows", spy)
    monkeypatch.setattr(LoopExecutor, "inserted_rowid", spy_one)
    order_id = str(uuid.uuid4())
    authorized = Message(
        id=new_id(),
        source="mercato/checkout",
        type=PAYMENT_AUTHORIZED,
        subject=order_id,
        time=datetime.now(UTC),
        data={"order_id": order_id, "authorization_id": "a-1", "amount_minor": 900, "currency": "EUR"},
        topic=PAYMENTS_TOPIC,
    )
    async with container.db.write() as conn:
        await container.payments.handle(conn, authorized)
    assert on_loop == ["eventstore_events"]
    view = await container.payments.ledger(order_id)
    assert [event.version for event in view.history] == [1]
    assert view.ledger.version == 1
