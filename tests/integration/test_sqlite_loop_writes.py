"""SQLite write transactions on the event loop's thread while the write lock is free (ADR 0062).

Uncontended, an event-store append in `Database.write()` makes no hop to aiosqlite's thread at
NORMAL (BEGIN IMMEDIATE, the append and COMMIT on the loop) and one at FULL (the COMMIT's fsync
stays off the loop). With the write lock held by another connection (another process, as
`mercato api` and `mercato worker` share the file), the append waits on aiosqlite's thread, the
event loop keeps turning, and the append lands once the lock is released.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import subprocess
import sys
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
from mercato.kit.storage.sqlite_loop import (
    CHECK_BACKLOG_EVERY,
    CHECKPOINT_FRAMES,
    THREAD_COMMIT_EVERY,
    LoopState,
    loop_state,
    wal_backlog_reader,
)
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


async def test_a_stream_loads_in_one_hand_off_as_it_was_appended(db: Database) -> None:
    store, stream = EventStore(), f"load-{uuid.uuid4()}"
    appended = []
    for version in range(5):
        async with db.write() as conn:
            event = NewEvent("t", {"n": version, "nested": {"a": [1, 2]}}, {"causation": "x"})
            appended += await store.append(conn, stream, [event], expected_version=version)
    async with db.read() as conn:
        assert conn.sync_connection is not None
        driver = conn.sync_connection.connection.driver_connection
        counting = _CountingQueue(driver._tx)
        driver._tx = counting
        try:
            loaded = await store.load(conn, stream)
            later = await store.load(conn, stream, after_version=3)
        finally:
            driver._tx = counting._queue
    # Equal field by field, the aware UTC timestamp included; one hand-off per load (through
    # SQLAlchemy's cursor result these two loads took 5, ADR 0076).
    assert loaded == appended
    assert later == appended[3:]
    assert loaded[0].recorded_at.tzinfo is not None
    assert counting.puts == 2


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


async def test_no_commit_goes_to_the_thread_before_a_checkpoint_is_due(db: Database) -> None:
    # ~200 frames: SQLite would not checkpoint yet, so no hand-off (ADR 0076; ADR 0062's writer
    # sent one commit in THREAD_COMMIT_EVERY there whatever the WAL held: 2-4 here).
    hops = await _hops_per_append(db, 3 * THREAD_COMMIT_EVERY)
    assert sum(hops) == 0, hops
    state = loop_state(await _driver(db))
    assert isinstance(state, LoopState)
    assert state.wal_backlog is not None
    assert 0 < state.wal_backlog() < CHECKPOINT_FRAMES


async def test_a_commit_goes_to_the_thread_once_a_checkpoint_is_due(db: Database) -> None:
    driver = await _driver(db)
    state = loop_state(driver)
    assert isinstance(state, LoopState)
    assert state.wal_backlog is not None
    store, stream = EventStore(), "due"
    most = 0
    # ~3 pages each: about 3,000 frames in all, so two or three checkpoints.
    for version in range(1000):
        async with db.write() as conn:
            await store.append(conn, stream, [NewEvent("t", {"pad": "x" * 9_000})], expected_version=version)
        most = max(most, state.wal_backlog())
    assert 2 <= state.commits_on_thread <= 8, state.commits_on_thread
    # Checkpointed as SQLite would at 1,000 frames, give or take CHECK_BACKLOG_EVERY commits.
    assert most < CHECKPOINT_FRAMES + CHECK_BACKLOG_EVERY * 4, most


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
    """`mercato up`'s event store user: the ledger consumer's load and append, inside the
    consumer's write transaction (with its inbox record), take the loop path."""
    on_loop: list[str] = []
    rows, inserted_rowid = LoopExecutor.rows, LoopExecutor.inserted_rowid

    async def spy(
        self: LoopExecutor, statement: ClauseElement, params: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        verb, rest = str(statement).split(" ", 1)
        on_loop.append(f"{verb} {rest.split('FROM', 1)[1].split()[0]}")
        return await rows(self, statement, params)

    def spy_one(self: LoopExecutor, statement: ClauseElement, params: dict[str, Any]) -> int | None:
        on_loop.append(f"INSERT {str(statement).split(' ', 3)[2]}")
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
    # The stream's load (ADR 0076) and its append.
    assert on_loop == ["SELECT eventstore_events", "INSERT eventstore_events"]
    view = await container.payments.ledger(order_id)
    assert [event.version for event in view.history] == [1]
    assert view.ledger.version == 1


_HOLDER = """
import sqlite3, sys
from mercato.kit.storage.sqlite_loop import wal_backlog_reader
raw = sqlite3.connect(sys.argv[1])
raw.execute("PRAGMA journal_mode=WAL")
raw.execute("CREATE TABLE t (x)")
raw.execute("INSERT INTO t VALUES (1)")
raw.commit()
backlog = wal_backlog_reader(raw)
assert backlog is not None and backlog() > 0
print("ready", flush=True)
sys.stdin.readline()
"""
# SQLite's shared lock on the wal-index that says "in use" (walformat.html: the DMS byte, 128).
_DMS_BYTE = 128


def test_the_backlog_reader_keeps_sqlites_lock_on_the_wal_index(tmp_path: Path) -> None:
    # The reader once opened the -shm file and closed it, which dropped SQLite's POSIX locks on it:
    # another process opening the database then rebuilt the wal-index under this one's feet (a
    # worker beside another died of SIGBUS at start, one run in four).
    path = tmp_path / "dms.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        fd = os.open(f"{path}-shm", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _DMS_BYTE)
        finally:
            os.close(fd)
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0


def test_the_backlog_reader_reads_a_database_made_anew_at_the_same_path(tmp_path: Path) -> None:
    # The -shm descriptor is kept per path: a database deleted and made again at the same path
    # (a reset, a test's fixture) must be read from its own file, not from the deleted one.
    path = tmp_path / "again.db"

    def fresh_backlog(rows: int) -> int:
        raw = sqlite3.connect(path)
        raw.execute("PRAGMA journal_mode=WAL")
        raw.execute("PRAGMA wal_autocheckpoint=0")
        raw.execute("CREATE TABLE t (x)")
        for n in range(rows):
            raw.execute("INSERT INTO t VALUES (?)", (n,))
            raw.commit()
        backlog = wal_backlog_reader(raw)
        assert backlog is not None
        try:
            return backlog()
        finally:
            raw.close()

    first = fresh_backlog(1)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    assert fresh_backlog(20) > first
