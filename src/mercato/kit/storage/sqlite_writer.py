"""One long-lived SQLite writer connection per event loop, its transactions begun on the driver (ADR 0064).

`Database.write()` on SQLite used to check a connection out of the pool, open a SQLAlchemy
`Connection` and its transaction, and undo all of it at the end: ~100 µs of CPU per write
transaction before its first statement, where SQLite's own BEGIN, INSERT and COMMIT cost ~30 µs
and the `eventsourcing` library's whole append ~45 µs (ADR 0062, "Consequences"). The process's
writes are serialized already (`Database.write` queues them on an asyncio lock, SQLite has one
writer per file), so they can all use one connection that never goes back to the pool:

- the pooled connection and a SQLAlchemy `Connection` on it are opened once per event loop and kept;
- a write transaction is `BEGIN IMMEDIATE` sent on the driver's `sqlite3` connection, on the loop:
  its busy timeout is 0 for good, so it takes the write lock at once or fails at once (another
  process holds it); only then does it wait on aiosqlite's thread with the normal busy timeout,
  the loop keeps turning (no pragma per transaction: the thread sets the timeout around its BEGIN);
- SQLAlchemy's transaction is not begun: the first statement sent through the `AsyncConnection`
  begins it (SQLAlchemy's autobegin; the `begin` hook finds the driver's transaction open and
  sends nothing). A transaction whose statements all went on the driver path (the event store's
  append: `transaction_executor`) never builds one, and ends with a COMMIT on the driver;
- the COMMIT runs on the loop or the thread as before (`commit_on_loop`, ADR 0062); at NORMAL the
  connection's WAL auto-checkpoint stays off and a commit goes to the thread to checkpoint when
  the WAL holds 1,000 frames not yet checkpointed (read from the `-shm` file, ADR 0076), as SQLite
  would checkpoint then, never on the loop.

Whatever leaves the connection in an unknown state (an error or a cancellation while a call ran on
the thread, an invalidated connection, a transaction found open at the start) discards it: it is
closed in the background (closing rolls back) and the next write opens a new one.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, ResourceClosedError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import greenlet_spawn

from mercato.kit.storage.sqlite_loop import (
    LoopState,
    checkpoint_due,
    commit_on_loop,
    commit_on_thread,
    loop_state,
    wal_backlog_reader,
)

__all__ = ["SqliteWriter", "WriterConnection", "open_writer"]

_BEGIN = "BEGIN IMMEDIATE"


class WriterConnection(AsyncConnection):
    """The writer's `AsyncConnection`, carrying what the loop path checks per statement
    (`transaction_executor`) without walking SQLAlchemy's connection, pool and adapter objects."""

    __slots__ = ("adapter", "in_scope", "loop_executor", "loop_state")

    def __init__(self, engine: AsyncEngine, sync: Connection, state: LoopState) -> None:
        super().__init__(engine, sync)
        # Inside a `Database.write()` scope: outside it the connection refuses every statement, as a
        # closed one would (a reference kept past the scope must not write unqueued).
        self.in_scope = False
        self.loop_state = state
        self.adapter: Any = sync.connection.dbapi_connection
        # `transaction_executor`'s executor for this connection, made on first use.
        self.loop_executor: Any = None

    @property
    def _proxied(self) -> Connection:
        if not self.in_scope:
            raise ResourceClosedError("This Connection is closed")
        sync = self.sync_connection
        assert sync is not None
        return sync


class SqliteWriter:
    """The writer connection of one event loop. Used only by whoever holds `Database`'s write lock."""

    __slots__ = ("_closing", "broken", "conn", "driver", "info", "loop", "state", "sync")

    def __init__(self, engine: AsyncEngine, sync: Connection, driver: Any, state: LoopState) -> None:
        # A writer serves one event loop (`LoopWrites`): its own, kept so that a call handed to the
        # thread needs no loop look-up (`get_event_loop` is a `getpid` system call on Python 3.11).
        self.loop = asyncio.get_running_loop()
        self.sync = sync
        self.driver = driver
        self.state = state
        # One AsyncConnection for every transaction: it only wraps `sync`.
        self.conn = WriterConnection(engine, sync, state)
        # The pooled connection's `info` (`conn.info`), kept for as long as the connection.
        self.info: dict[Any, Any] = sync.info
        self.broken = False
        self._closing: asyncio.Task[None] | None = None

    def begin_here(self) -> bool:
        """BEGIN IMMEDIATE on the loop. False: another connection holds the write lock; the caller
        awaits `begin_waiting` (nothing was begun)."""
        state = self.state
        raw = state.raw
        if raw.in_transaction or self.sync.in_transaction() or self.sync.invalidated:
            # Someone used the connection outside a write transaction (a stale reference).
            self.broken = True
            raise _Unusable
        try:
            raw.execute(_BEGIN)  # the busy timeout is 0: never a wait on the loop
        except sqlite3.OperationalError as error:
            if getattr(error, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
                raise DBAPIError.instance(_BEGIN, (), error, sqlite3.Error) from error
            return False
        state.begins_on_loop += 1
        state.write_locked = True
        return True

    async def begin_waiting(self) -> None:
        """BEGIN IMMEDIATE on aiosqlite's thread with the normal busy timeout: the loop keeps turning."""
        state = self.state
        state.begins_on_thread += 1
        try:
            await self.driver._execute(_begin_waiting, state.raw, state.busy_timeout_ms)
        except sqlite3.Error as waited:
            # "database is locked" after the busy timeout: what SQLAlchemy raises for it.
            raise DBAPIError.instance(_BEGIN, (), waited, sqlite3.Error) from waited
        except BaseException:
            # Cancelled while the BEGIN waits on the thread: it may still take the lock there.
            self.broken = True
            raise
        state.write_locked = True

    def commit_here(self) -> bool:
        """COMMIT on the loop when nothing stands in the way (no SQLAlchemy transaction to end,
        `commit_on_loop` agrees); False: the caller awaits `end`, nothing was done."""
        state = self.state
        sync = self.sync
        if sync._transaction is not None or sync.invalidated or not state.commit_on_loop:
            return False
        if checkpoint_due(state):
            return False  # the checkpoint's turn: `end` commits on the thread
        try:
            commit_on_loop(state)
        except sqlite3.Error as error:
            self.broken = True
            raise DBAPIError.instance("COMMIT", (), error, sqlite3.Error) from error
        finally:
            state.write_locked = False
        # The engine's listeners (statement counters) see the end of the transaction as if
        # SQLAlchemy had ended one.
        listeners = sync.dispatch.commit
        if listeners:
            listeners(sync)
        return True

    async def on_thread(self, function: Callable[[], Any]) -> Any:
        """`function()` on aiosqlite's thread, after whatever is queued there: aiosqlite's own
        `_execute` without its loop look-up and `partial` (a COMMIT at FULL, once per append)."""
        driver = self.driver
        if not driver._running or driver._connection is None:
            raise ValueError("Connection closed")
        future = self.loop.create_future()
        driver._tx.put_nowait((future, function))
        return await future

    async def end(self, *, commit: bool) -> bool:
        """COMMIT or ROLLBACK: through SQLAlchemy's transaction when a statement began one, else on
        the driver (on the loop when `commit_on_loop` allows it, else one call on the thread).
        True: it went to the thread (the loop turned meanwhile)."""
        state = self.state
        sync = self.sync
        try:
            if sync.in_transaction():
                await greenlet_spawn(sync.commit if commit else sync.rollback)
                if sync.invalidated:
                    self.broken = True
                return True
            if sync.invalidated:
                # Lost mid-transaction (a disconnect SQLAlchemy saw): nothing left to commit.
                self.broken = True
                if commit:
                    raise DBAPIError.instance(
                        "COMMIT", (), sqlite3.OperationalError("connection invalidated"), sqlite3.Error
                    )
                return False
            on_thread = True
            if commit:
                if commit_on_loop(state):
                    on_thread = False
                else:
                    await self.on_thread(commit_on_thread(state))
            else:
                # On the thread, after any call still queued there (a cancelled one).
                await self.on_thread(state.raw.rollback)
            listeners = sync.dispatch.commit if commit else sync.dispatch.rollback
            if listeners:
                listeners(sync)
            return on_thread
        except sqlite3.Error as error:
            self.broken = True
            sql = "COMMIT" if commit else "ROLLBACK"
            raise DBAPIError.instance(sql, (), error, sqlite3.Error) from error
        except BaseException:
            self.broken = True
            raise
        finally:
            state.write_locked = False

    def discard(self) -> None:
        """Close the connection in the background (after whatever is still queued on its thread)."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(greenlet_spawn(_close, self.sync))

    async def aclose(self) -> None:
        self.discard()
        assert self._closing is not None
        await self._closing


class _Unusable(Exception):
    """The writer was found in a transaction it did not begin: the caller opens a new one."""


def _begin_waiting(raw: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """On aiosqlite's thread: BEGIN IMMEDIATE with the normal busy timeout, then back to 0."""
    raw.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    try:
        raw.execute(_BEGIN)
    finally:
        raw.execute("PRAGMA busy_timeout=0")


def _close(sync: Connection) -> None:
    # Invalidate: the connection's pragmas (busy timeout 0, no auto-checkpoint) must not go back
    # into the pool; closing the driver connection rolls back whatever it still had open.
    try:
        sync.invalidate()
    finally:
        sync.close()


async def open_writer(engine: AsyncEngine) -> SqliteWriter | None:
    """A writer on a new connection of `engine`'s pool, or None when the connection has no loop
    path (not aiosqlite, not WAL: an in-memory database) and the caller writes as before."""
    sync = await greenlet_spawn(engine.sync_engine.connect)
    driver = sync.connection.driver_connection
    state = loop_state(driver)
    if state is None:
        await greenlet_spawn(sync.close)
        return None
    # Nothing is in flight on the connection: it was just checked out, the loop may use it.
    state.raw.execute("PRAGMA busy_timeout=0")
    if state.commit_on_loop:
        state.raw.execute("PRAGMA wal_autocheckpoint=0")
        state.wal_backlog = wal_backlog_reader(state.raw)
    state.dedicated = True
    return SqliteWriter(engine, sync, driver, state)


def is_unusable(error: BaseException) -> bool:
    return isinstance(error, _Unusable)
