"""`Database.write()` on SQLite: this loop's write queue, then a transaction on its writer connection.

A class rather than a generator-based context manager (two of those cost ~8 µs of a ~50 µs
write): queue on the loop's write lock, then BEGIN, the caller's statements and COMMIT on the
writer connection (sqlite_writer.py, ADR 0064), on the loop when nothing stands in the way; on
a pooled connection when the database has no writer (in memory) or the queue timed out (a
nested write waits no longer than the busy timeout).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.storage.commit_guard import COMMIT_GUARD
from mercato.kit.storage.sqlite_writer import SqliteWriter, is_unusable

if TYPE_CHECKING:
    from mercato.kit.storage.database import Database

__all__ = ["YIELD_EVERY_S", "LoopWrites", "SqliteWriteScope", "end_on_writer"]


class LoopWrites:
    """One event loop's write queue and SQLite writer connection."""

    __slots__ = ("lock", "signals", "writer", "yielded_at")

    def __init__(self, lock: asyncio.Lock) -> None:
        self.lock = lock
        self.writer: SqliteWriter | None = None
        self.yielded_at = 0.0
        # The database's `WorkSignals.loop_state()` for this loop, taken on the first commit.
        self.signals: Any = None


# A write on the writer connection may finish without suspending; writes back to back yield the
# loop once this long has passed since the last yield (ADR 0064; ADR 0062 yielded after each).
YIELD_EVERY_S = 0.0005


class SqliteWriteScope:
    """One `Database.write()` scope on SQLite (see the module's docstring)."""

    __slots__ = ("_db", "_fallback", "_queued", "_writer", "_writes")

    def __init__(self, db: Database) -> None:
        self._db = db
        self._writer: SqliteWriter | None = None
        self._fallback: AbstractAsyncContextManager[AsyncConnection] | None = None
        self._queued = False

    async def __aenter__(self) -> AsyncConnection:
        db = self._db
        self._writes = writes = db._writes()
        lock = writes.lock
        if not lock.locked():
            await lock.acquire()
            self._queued = True
        else:
            self._queued = await db._queue_for_the_writer(lock)
        try:
            if self._queued:
                for _ in range(2):  # a writer found in an unknown state is replaced once
                    writer = writes.writer
                    if writer is None or writer.broken:
                        writer = await db._open_writer(writes)
                        if writer is None:
                            break
                    try:
                        if not writer.begin_here():
                            await writer.begin_waiting()
                    except Exception as error:
                        if is_unusable(error):
                            continue
                        raise
                    self._writer = writer
                    writer.conn.in_scope = True
                    return writer.conn
            self._fallback = fallback = db._sqlite_write_transaction()
            return await fallback.__aenter__()
        except BaseException:
            if self._queued:
                lock.release()
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        writer = self._writer
        try:
            if writer is not None:
                db = self._db

                if exc is None and COMMIT_GUARD.get() is None and writer.commit_here():
                    # The common case, without a coroutine: COMMIT on the loop. Channels queued
                    # by `after_commit` fire now (taken after the COMMIT: nothing else can use
                    # the connection meanwhile, the write lock is still ours).
                    writes = self._writes
                    if writes.signals is None:
                        writes.signals = db.signals.loop_state()
                    db.signals.committed_in(writes.signals, writer.info)
                else:
                    writes = self._writes
                    if writes.signals is None:
                        writes.signals = db.signals.loop_state()
                    if await end_on_writer(db, writer, exc, writes.signals):
                        # It waited on the thread (a COMMIT at FULL): the loop has just turned,
                        # so the turn below is not owed (one loop pass and system call fewer).
                        writes.yielded_at = time.monotonic()
            else:
                assert self._fallback is not None
                if await self._fallback.__aexit__(exc_type, exc, tb):
                    return True
        finally:
            if writer is not None:
                writer.conn.in_scope = False  # a reference kept past the scope must not write
            if self._queued:
                self._writes.lock.release()
        if writer is not None and exc is None:
            # On the writer a write may never suspend: a task writing in a loop would hold the
            # event loop for the whole loop. A turn every YIELD_EVERY_S lets every other task run.
            writes = self._writes
            if time.monotonic() - writes.yielded_at >= YIELD_EVERY_S:
                await asyncio.sleep(0)
                writes.yielded_at = time.monotonic()
        return False


async def end_on_writer(
    db: Database, writer: SqliteWriter, error: BaseException | None, signals: Any = None
) -> bool:
    """COMMIT (after the commit guard) or ROLLBACK on the writer, the slow way: through SQLAlchemy's
    transaction, or on the thread; a writer left in an unknown state is discarded. `signals`: this
    loop's `WorkSignals.loop_state()`, when the caller keeps it. True: the loop turned meanwhile."""
    conn = writer.conn
    try:
        if error is None:
            try:
                # The fencing check (kit/coordination): last statement before COMMIT.
                guard = COMMIT_GUARD.get()
                if guard is not None:
                    await guard(conn)
            except BaseException:
                db._drop_pending(conn)
                await writer.end(commit=False)
                raise
            # Taken before the COMMIT: the next transaction on the connection starts clean.
            pending = db.signals.take_pending_from(writer.info)
            turned = await writer.end(commit=True)
            if signals is None:
                db.signals.committed(pending)
            else:
                db.signals.committed_in(signals, {})  # counted without a loop look-up
                if pending:
                    db.signals.fire(*pending)
            return turned
        db._drop_pending(conn)
        return await writer.end(commit=False)
    finally:
        if writer.broken and db._writes().writer is writer:
            writer.discard()
