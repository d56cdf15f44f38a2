"""SQLite transactions on the event loop's thread while nobody else holds the write lock (ADR 0062).

aiosqlite runs every call on the connection's worker thread; each call is a hand-off between two
threads (a queue put, a thread wake-up, a self-pipe write back to the loop) that costs tens of
microseconds of CPU, more than a small statement itself. A write transaction paid at least three
of them: BEGIN IMMEDIATE, its statement, COMMIT (ADR 0058). The thread exists for one reason: a
writer that finds the file locked by another process (`mercato api` and `mercato worker` share it)
waits in SQLite's busy handler, and that wait must never block the event loop.

So the statements that cannot wait run on the loop, on aiosqlite's own `sqlite3` connection
(opened with `check_same_thread=False`), and only those:

- `BEGIN IMMEDIATE` with a zero busy timeout: it takes the write lock at once or fails at once with
  SQLITE_BUSY; only then does it go to the thread with the normal busy timeout and wait there.
  A deferred `BEGIN` (a read) takes no lock at all: always on the loop.
- Statements of a transaction that holds the write lock (`LoopState.write_locked`): in WAL mode
  nothing they need can be held by anyone else. `sqlite_loop_statements.py` runs the registered
  ones there (the event store's append).
- COMMIT at `synchronous=NORMAL` in WAL mode: it writes the WAL's frames into the page cache and
  releases the lock, no fsync. The one thing that can make it long is the WAL's automatic
  checkpoint (it copies the WAL into the database file and fsyncs both), so a commit on the loop
  turns it off for itself; every `THREAD_COMMIT_EVERY`-th commit goes to the thread with it on,
  so the WAL is checkpointed as often as SQLite would (at 1,000 pages) and never on the loop.
  At FULL every COMMIT fsyncs the WAL (0.3 to several ms on a shared disk): it stays on the thread.

A call goes to the loop only while the connection is checked out to the caller and no aiosqlite
call is in flight on it: SQLAlchemy's adapter awaits each call under its `_execute_mutex`, and
the hooks below run between two awaited calls (begin, commit). ROLLBACK stays on the thread: it
also runs after a cancellation, while a cancelled call may still be running there.
"""

from __future__ import annotations

import sqlite3
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "THREAD_COMMIT_EVERY",
    "LoopState",
    "began_on_thread",
    "begin_on_loop",
    "commit_on_loop",
    "commit_on_thread",
    "connect_and_begin",
    "end_and_close",
    "loop_state",
    "register_loop_connection",
]

# One COMMIT in this many runs on aiosqlite's thread with the WAL's auto-checkpoint on.
THREAD_COMMIT_EVERY = 64


@dataclass(slots=True)
class LoopState:
    """What the loop path knows about one pooled aiosqlite connection."""

    raw: sqlite3.Connection
    busy_timeout_ms: int
    # COMMIT may run on the loop: WAL and synchronous=NORMAL (no fsync per commit).
    commit_on_loop: bool
    # The current transaction began with BEGIN IMMEDIATE (on the loop or the thread): it holds the
    # write lock, so none of its statements can wait for another connection.
    write_locked: bool = False
    # Commits on the loop since the last one on the thread (the checkpoint's turn).
    loop_commits: int = 0
    # The process's long-lived writer connection (`sqlite_writer.py`, ADR 0064): its busy timeout is
    # 0 and, when it commits on the loop, its WAL auto-checkpoint is off for good, so neither needs
    # a pragma per transaction; the thread's commits turn the checkpoint on around themselves.
    dedicated: bool = False
    # Counters for tests and the bench: where BEGIN IMMEDIATE and COMMIT ran.
    begins_on_loop: int = 0
    begins_on_thread: int = 0
    commits_on_thread: int = 0


# Keyed by aiosqlite's `Connection`: the state lives and dies with the pooled connection.
_STATES: weakref.WeakKeyDictionary[Any, LoopState] = weakref.WeakKeyDictionary()


def register_loop_connection(driver: Any, *, busy_timeout_ms: int, synchronous: str) -> None:
    """Make `driver` (an aiosqlite connection, freshly opened and prepared) eligible for the loop
    path. Left out: another driver, a connection whose `sqlite3` object refuses to be used from
    this thread (`check_same_thread`), or one not in WAL mode (an in-memory database: there a
    COMMIT of the rollback journal could wait for readers)."""
    raw = getattr(driver, "_connection", None)
    if not isinstance(raw, sqlite3.Connection) or not hasattr(driver, "execute_fetchall"):
        return
    try:
        journal = raw.execute("PRAGMA journal_mode").fetchone()[0]
    except sqlite3.ProgrammingError:
        return  # created in another thread with check_same_thread=True
    wal = str(journal).lower() == "wal"
    _STATES[driver] = LoopState(
        raw=raw,
        busy_timeout_ms=busy_timeout_ms,
        commit_on_loop=wal and synchronous.upper() == "NORMAL",
    )


def loop_state(driver: Any) -> LoopState | None:
    """The loop path's state of `driver`, or None if it has none (not eligible)."""
    try:
        return _STATES.get(driver)
    except TypeError:  # not weak-referenceable: not an aiosqlite connection
        return None


def begin_on_loop(state: LoopState, *, immediate: bool) -> bool:
    """BEGIN on the loop. True: begun. False: `BEGIN IMMEDIATE` found the write lock taken; the
    caller begins on the thread instead, where the busy handler may wait (nothing was begun)."""
    raw = state.raw
    if not immediate:
        raw.execute("BEGIN")
        state.write_locked = False
        return True
    raw.execute("PRAGMA busy_timeout=0")
    try:
        raw.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as error:
        if getattr(error, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
            raise
        state.begins_on_thread += 1
        return False
    finally:
        raw.execute(f"PRAGMA busy_timeout={state.busy_timeout_ms}")
    state.write_locked = True
    state.begins_on_loop += 1
    return True


def began_on_thread(state: LoopState, *, immediate: bool) -> None:
    """Record a BEGIN that ran on the thread (after `begin_on_loop` returned False)."""
    state.write_locked = immediate


def commit_on_loop(state: LoopState) -> bool:
    """COMMIT on the loop when it cannot block it (WAL, NORMAL, no checkpoint). False: the caller
    commits on the thread (FULL durability, or the checkpoint's turn)."""
    state.write_locked = False
    if not state.commit_on_loop or state.loop_commits >= THREAD_COMMIT_EVERY:
        state.loop_commits = 0
        state.commits_on_thread += 1
        return False
    raw = state.raw
    if not raw.in_transaction:
        return True
    if state.dedicated:
        raw.commit()  # its auto-checkpoint is off already
    else:
        raw.execute("PRAGMA wal_autocheckpoint=0")
        try:
            raw.commit()
        finally:
            raw.execute("PRAGMA wal_autocheckpoint=1000")
    state.loop_commits += 1
    return True


def commit_on_thread(state: LoopState) -> Callable[[], None]:
    """What runs on aiosqlite's thread for a COMMIT that `commit_on_loop` left to it: a plain
    commit, or, on the dedicated writer whose auto-checkpoint is off, a commit with the checkpoint
    turned on around it (SQLite then checkpoints as it would, at 1,000 pages; off the loop)."""
    raw = state.raw
    if not (state.dedicated and state.commit_on_loop):
        return raw.commit

    def checkpointed() -> None:
        raw.execute("PRAGMA wal_autocheckpoint=1000")
        try:
            raw.commit()
        finally:
            raw.execute("PRAGMA wal_autocheckpoint=0")

    return checkpointed


def connect_and_begin(engine: AsyncEngine) -> Connection:
    """Check out a connection of `engine` and begin (run in a greenlet: BEGIN may wait on the
    thread)."""
    sync = engine.sync_engine.connect()
    try:
        sync.begin()
    except BaseException:
        sync.close()
        raise
    return sync


def end_and_close(sync: Connection, *, commit: bool) -> None:
    """COMMIT (or ROLLBACK) and check the connection in, in one greenlet run."""
    try:
        if commit:
            sync.commit()
        else:
            sync.rollback()
    finally:
        sync.close()
