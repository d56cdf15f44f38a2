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
  The process's writer connection sends a commit there only when a checkpoint is due: when the WAL
  holds `CHECKPOINT_FRAMES` frames not yet copied into the database, read from the wal-index in
  the `-shm` file (`wal_backlog_reader`, ADR 0076).
  At FULL every COMMIT fsyncs the WAL (0.3 to several ms on a shared disk): it stays on the thread.

A call goes to the loop only while the connection is checked out to the caller and no aiosqlite
call is in flight on it: SQLAlchemy's adapter awaits each call under its `_execute_mutex`, and
the hooks below run between two awaited calls (begin, commit). ROLLBACK stays on the thread: it
also runs after a cancellation, while a cancelled call may still be running there.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "CHECKPOINT_FRAMES",
    "THREAD_COMMIT_EVERY",
    "LoopState",
    "began_on_thread",
    "begin_on_loop",
    "checkpoint_due",
    "commit_on_loop",
    "commit_on_thread",
    "connect_and_begin",
    "end_and_close",
    "loop_state",
    "register_loop_connection",
    "wal_backlog_reader",
]

# One COMMIT in this many runs on aiosqlite's thread with the WAL's auto-checkpoint on; on a
# connection with a `wal_backlog` reader, at most one in this many and only when a checkpoint is due.
THREAD_COMMIT_EVERY = 64
# SQLite's automatic checkpoint threshold (`wal_autocheckpoint`'s default, in WAL frames = pages).
CHECKPOINT_FRAMES = 1000
# With a `wal_backlog` reader, one COMMIT in this many still goes to the thread whatever it reads:
# the backstop should the reader ever see a stale wal-index (a `-shm` file SQLite replaced).
THREAD_COMMIT_AT_LEAST_EVERY = 4096
# How often (in commits, from `THREAD_COMMIT_EVERY` on) the wal-index is read: one read costs about
# what 8 commits' share of one hand-off to the thread did; the WAL overshoots 1,000 frames by at most
# this many commits' frames.
CHECK_BACKLOG_EVERY = 16


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
    # The WAL's frames not yet checkpointed (`wal_backlog_reader`), or None: then every
    # `THREAD_COMMIT_EVERY`-th commit goes to the thread whether a checkpoint is due or not.
    wal_backlog: Callable[[], int] | None = None
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
    if not state.commit_on_loop or checkpoint_due(state):
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


def checkpoint_due(state: LoopState) -> bool:
    """This COMMIT goes to the thread with the auto-checkpoint on (a loop commit runs without it).

    Without a `wal_backlog` reader: one commit in `THREAD_COMMIT_EVERY`, due or not (ADR 0062; a
    commit on the thread is a hand-off that costs more CPU than the commit itself, and at ~50 µs
    per append one in 64 was the 2–3 % by which the event store's append trailed the library's).
    With one: only once the WAL holds `CHECKPOINT_FRAMES` frames not yet copied into the database,
    as SQLite's own auto-checkpoint would run then, and at most once per `THREAD_COMMIT_EVERY`
    commits (a checkpoint that readers keep from finishing is not retried on every commit)."""
    commits = state.loop_commits
    if commits < THREAD_COMMIT_EVERY:
        return False
    backlog = state.wal_backlog
    if backlog is None or commits >= THREAD_COMMIT_AT_LEAST_EVERY:
        return True
    return commits % CHECK_BACKLOG_EVERY == 0 and backlog() >= CHECKPOINT_FRAMES


# One read-only descriptor per `-shm` file, opened once and never closed: closing any descriptor
# of a file drops every POSIX lock the process holds on it, SQLite's own included (its shared lock
# on the wal-index's "DMS" byte). Without that lock, another process opening the database takes
# the wal-index for unused, truncates and rebuilds it under this process's connections: a
# `mercato worker` beside another died of SIGBUS (its memory map of the file past the new end).
_SHM_DESCRIPTORS: dict[str, int] = {}


def wal_backlog_reader(raw: sqlite3.Connection) -> Callable[[], int] | None:
    """A function reading how many WAL frames are not checkpointed yet: the wal-index header's
    `mxFrame` (byte 16) minus the checkpoint info's `nBackfill` (byte 96), both 32-bit in the
    machine's byte order (https://www.sqlite.org/walformat.html), read from the `-shm` file with
    one `pread` (about a microsecond, once per `CHECK_BACKLOG_EVERY` commits) on a descriptor kept
    for the process's life (`_SHM_DESCRIPTORS`). A read, not a memory map: should the file be
    rebuilt while this process has no connection open, a short read is just 0, nothing known due
    (`THREAD_COMMIT_AT_LEAST_EVERY` is the backstop). None: no such file (not WAL, in memory)."""
    row = raw.execute("PRAGMA database_list").fetchone()
    path = os.path.realpath(f"{row[2]}-shm") if row and row[2] else ""
    if not path:
        return None
    fd = _SHM_DESCRIPTORS.get(path)
    try:
        if fd is None or os.fstat(fd).st_ino != os.stat(path).st_ino:
            # First use, or the database was deleted and made anew at the same path: the kept
            # descriptor reads the old file. It stays open (closing it could drop a lock SQLite
            # still holds on that file, see above); the new file gets its own.
            fd = _SHM_DESCRIPTORS[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    read_u32 = struct.Struct("=I").unpack_from

    def backlog() -> int:
        try:
            header = os.pread(fd, 100, 0)
        except OSError:
            return 0
        if len(header) < 100:
            return 0
        return int(read_u32(header, 16)[0] - read_u32(header, 96)[0])

    return backlog


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
