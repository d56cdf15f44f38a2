"""One `Database` per process: an async engine plus read and write transaction scopes.

Reads use a plain (deferred) transaction on SQLite, where it gives the read one snapshot. On
PostgreSQL they run in autocommit: at READ COMMITTED every statement takes its own snapshot even
inside a transaction, so BEGIN and ROLLBACK would buy nothing but two round trips (~450 µs of
client CPU per read on this kind of machine). Writes on SQLite start with `BEGIN IMMEDIATE`, taking
the write lock up front: a deferred transaction that reads and then writes fails at once with
SQLITE_BUSY when another writer committed in between, instead of waiting its turn.

SQLite has one writer per file, and a writer that finds the lock taken waits in SQLite's busy
handler, which sleeps and polls (1, 2, 5, ... up to 100 ms between tries): the lock can sit free for
tens of milliseconds while everyone sleeps. So the writers of one process queue on an asyncio lock
first and take the file lock one after another, each the moment the previous one commits; only the
other processes' writers still meet the busy handler. A wait on that queue longer than the busy
timeout stops queueing and goes to SQLite as before (a nested write would otherwise wait forever).
Since the queue makes the process's writers take turns anyway, they share one long-lived writer
connection per event loop, whose transactions are begun on the driver and open SQLAlchemy's only
when a statement goes through it (sqlite_writer.py, sqlite_write_scope.py, ADR 0064).

With read replicas (`replicas.py`, ADR 0032) a read that names a `Staleness` may be served by a
replica; every other read, and every write, stays on the primary. When a request's consistency
scope is open, each committed write records the primary's LSN for the response's token.

A *commit guard* (`guarded_writes`) is a statement run at the end of every write transaction opened
in its context, just before COMMIT: if it raises, the transaction rolls back. Fencing tokens use
it (kit/coordination/fencing.py): a singleton job's writes commit only while its term is current.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import weakref
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.util import await_, greenlet_spawn
from sqlalchemy.util.concurrency import in_greenlet

from mercato.kit.storage.commit_guard import COMMIT_GUARD
from mercato.kit.storage.reachability import Reachability
from mercato.kit.storage.replicas import (
    ReplicaHook,
    ReplicaSet,
    Staleness,
    commit_lsn,
    current_scope,
    driver_commit_lsn,
)
from mercato.kit.storage.signals import WorkSignals
from mercato.kit.storage.sqlite_loop import (
    began_on_thread,
    begin_on_loop,
    commit_on_loop,
    commit_on_thread,
    connect_and_begin,
    end_and_close,
    loop_state,
    register_loop_connection,
)
from mercato.kit.storage.sqlite_write_scope import LoopWrites, SqliteWriteScope
from mercato.kit.storage.sqlite_writer import SqliteWriter, open_writer

_WRITE_OPTION = "mercato_write"
# What a SQLite commit survives: NORMAL a process crash, FULL also a power loss (ADR 0058).
SQLITE_SYNCHRONOUS = ("NORMAL", "FULL")


class Database:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        write_queue_timeout_s: float = 10.0,
        replicas: ReplicaSet | None = None,
        reachability: Reachability | None = None,
    ) -> None:
        self.engine = engine
        self.replicas = replicas
        # PostgreSQL: refuse at once while the primary is unreachable (a partition; reachability.py).
        self.reachability = reachability
        # Wake on work (signals.py): the loops that handle work wait on these instead of polling.
        self.signals = WorkSignals(engine)
        self._autocommit_engine = (
            engine.execution_options(isolation_level="AUTOCOMMIT")
            if engine.dialect.name == "postgresql"
            else None
        )
        self._serialize_writes = engine.dialect.name == "sqlite"
        # Write transactions carry the option that makes their BEGIN take the write lock (SQLite).
        self._write_engine = engine.execution_options(**{_WRITE_OPTION: True})
        self._write_queue_timeout_s = write_queue_timeout_s
        # One lock (and on SQLite one writer connection, ADR 0064) per event loop: a Database may
        # outlive a loop (tests, CLI commands run in turn).
        self._loop_writes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWrites] = (
            weakref.WeakKeyDictionary()
        )
        # The last loop's entry, looked up without a weak reference per write (ADR 0069). It keeps
        # that loop object alive until another loop writes: a closed loop holds no resources.
        self._last_writes: tuple[asyncio.AbstractEventLoop | None, LoopWrites | None] = (None, None)
        self._writer_eligible = self._serialize_writes

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def url(self) -> URL:
        return self.engine.url

    @asynccontextmanager
    async def read(self, *, staleness: Staleness | None = None) -> AsyncIterator[AsyncConnection]:
        """A connection for reading: in a transaction rolled back on exit (SQLite), or in
        autocommit (PostgreSQL; see the module's docstring). Never write through it.

        `staleness` lets a replica serve it (when replicas are configured): one in rotation, lagging
        no more than `staleness.max_lag_s`, and, if the request carries a consistency token, having
        replayed it within the set's wait bound. Otherwise, and without `staleness`, the primary."""
        if staleness is not None and self.replicas is not None:
            async with self._replica_read(self.replicas, staleness) as conn:
                yield conn
            return
        if self.reachability is not None:
            self.reachability.check()
        async with (self._autocommit_engine or self.engine).connect() as conn:
            try:
                yield conn
            except BaseException:
                # Interrupted (a cancellation mid-statement invalidates the connection): the
                # rollback's own error must not replace the exception under way. It did, and a
                # consumer's `except Exception` then swallowed a cancellation and its task never
                # stopped (a hub's stop hung on the SQL broker's poll).
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise
            await conn.rollback()

    @asynccontextmanager
    async def _replica_read(
        self, replicas: ReplicaSet, staleness: Staleness
    ) -> AsyncIterator[AsyncConnection]:
        replicas.refresh_soon(self.engine)
        scope = current_scope()
        after = scope.after if scope is not None and staleness.read_your_writes else None
        async with contextlib.AsyncExitStack() as stack:
            chosen: AsyncConnection | None = None
            reason = "no replica in rotation within the staleness bound"
            for replica in replicas.candidates(staleness):
                try:
                    conn = await stack.enter_async_context(replica.engine.connect())
                    if after is None or await replicas.reached(conn, replica, after):
                        chosen = conn
                        reason = "token reached" if after is not None else "within staleness"
                        break
                    reason = "token not replayed in time"
                except Exception:  # noqa: BLE001 - a replica failing is a reason to read the primary
                    reason = "replica failed"
                await stack.aclose()
                break  # one replica tried per read: the wait bound is the read's, not per replica
            if chosen is not None:
                replicas.hook.read_routed("replica", reason)
                yield chosen
                return
        replicas.hook.read_routed("primary", reason)
        async with (self._autocommit_engine or self.engine).connect() as conn:
            yield conn

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A connection whose every statement commits on its own, for a write that is one statement
        or a compare-and-set sequence that is safe without a transaction (PostgreSQL: no BEGIN and
        COMMIT round trips). On SQLite it is a write transaction: the one writer still queues."""
        if self._autocommit_engine is None or COMMIT_GUARD.get() is not None:
            async with self.write() as conn:
                yield conn
            return
        if self.reachability is not None:
            self.reachability.check()
        async with self._autocommit_engine.connect() as conn:
            try:
                yield conn
            except BaseException:
                self._drop_pending(conn)
                raise
            self.signals.fire_pending(conn, committed=True)
            await self._record_commit(conn)

    async def _record_commit(self, conn: AsyncConnection) -> None:
        """Hand the commit LSN to the request's consistency scope (only with replicas to route to)."""
        if self.replicas is None:
            return
        scope = current_scope()
        if scope is not None:
            scope.wrote(await commit_lsn(conn))

    async def record_driver_commit(self, driver: Any) -> None:
        """`_record_commit` for a transaction the raw-driver path committed on `driver` (asyncpg):
        a write there must hand out its consistency token too (read-your-writes, ADR 0032)."""
        if self.replicas is None:
            return
        scope = current_scope()
        if scope is not None:
            scope.wrote(await driver_commit_lsn(driver))

    def write(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection in a write transaction: committed on success, rolled back on error."""
        if self._serialize_writes:
            return SqliteWriteScope(self)
        return self._write_transaction()

    def _writes(self) -> LoopWrites:
        loop = asyncio.get_running_loop()
        last_loop, writes = self._last_writes
        if last_loop is loop and writes is not None:
            return writes
        writes = self._loop_writes.get(loop)
        if writes is None:
            writes = self._loop_writes[loop] = LoopWrites(asyncio.Lock())
        self._last_writes = (loop, writes)
        return writes

    async def _queue_for_the_writer(self, lock: asyncio.Lock) -> bool:
        """Take this loop's write lock; False when the wait passed the busy timeout (the write then
        goes to SQLite unqueued: a nested write would otherwise wait forever)."""
        if not lock.locked():
            await lock.acquire()  # free: taken at once, no timer needed
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._write_queue_timeout_s):
                await lock.acquire()
                return True
        return False

    async def _open_writer(self, writes: LoopWrites) -> SqliteWriter | None:
        """This loop's long-lived writer connection (sqlite_writer.py), opened on first use and
        after a discarded one; None when the database has none (an in-memory one). Called with the
        write lock held."""
        if not self._writer_eligible:
            return None
        if writes.writer is not None:
            writes.writer.discard()
            writes.writer = None
        for loop, other in list(self._loop_writes.items()):
            if loop.is_closed() and other.writer is not None:  # tests, CLI commands run in turn
                other.writer.discard()
                other.writer = None
        writer = await open_writer(self._write_engine)
        if writer is None:
            self._writer_eligible = False
            return None
        writes.writer = writer
        return writer

    @asynccontextmanager
    async def _write_transaction(self) -> AsyncIterator[AsyncConnection]:
        """PostgreSQL's write transaction."""
        if self.reachability is not None:
            self.reachability.check()
        async with self._write_engine.connect() as conn:
            try:
                async with conn.begin():
                    yield conn
                    # The fencing check (kit/coordination): last statement before COMMIT.
                    guard = COMMIT_GUARD.get()
                    if guard is not None:
                        await guard(conn)
            except BaseException:
                self._drop_pending(conn)
                raise
            self.signals.fire_pending(conn, committed=True)
            await self._record_commit(conn)

    def _drop_pending(self, conn: AsyncConnection) -> None:
        """A rolled-back transaction's signals never fire. A connection lost mid-transaction is
        invalidated with its `info` (and the signals in it): asking for `info` would reconnect
        outside a greenlet and hide the outage behind MissingGreenlet."""
        if not conn.invalidated:
            self.signals.fire_pending(conn, committed=False)

    @asynccontextmanager
    async def _sqlite_write_transaction(self) -> AsyncIterator[AsyncConnection]:
        """The same scope on SQLite in two greenlet runs instead of four (check out and BEGIN, then
        COMMIT or ROLLBACK and check in): with BEGIN and COMMIT on the loop's thread
        (sqlite_loop.py), each greenlet run was a fifth of an uncontended write's CPU, and
        SQLAlchemy's `async with` closes in a task of its own behind `asyncio.shield`, three
        turns of the event loop (ADR 0062). The check-in awaits nothing (no reset on return)
        unless it closes the connection (an overflow or an invalidated one): only then is the end
        shielded from a cancellation. No replicas on SQLite: nothing to record after COMMIT."""
        conn = AsyncConnection(
            self._write_engine, await greenlet_spawn(connect_and_begin, self._write_engine)
        )
        try:
            yield conn
            guard = COMMIT_GUARD.get()
            if guard is not None:
                await guard(conn)
        except BaseException:
            self._drop_pending(conn)
            await self._finish(conn, commit=False)
            raise
        # Taken before the COMMIT: once checked in, the connection's `info` is the next user's.
        pending = self.signals.take_pending(conn)
        await self._finish(conn, commit=True)
        self.signals.committed(pending)
        # On the loop path a write may never suspend: a task writing in a loop would hold the
        # event loop for the whole loop. One turn per write lets every other task run.
        await asyncio.sleep(0)

    async def _finish(self, conn: AsyncConnection, *, commit: bool) -> None:
        sync = conn.sync_connection
        assert sync is not None
        pool: Any = self.engine.pool
        if not conn.invalidated and getattr(pool, "overflow", lambda: 1)() <= 0:
            await greenlet_spawn(end_and_close, sync, commit=commit)
            return
        ending = asyncio.ensure_future(greenlet_spawn(end_and_close, sync, commit=commit))
        cancelled: asyncio.CancelledError | None = None
        while not ending.done():
            try:
                await asyncio.shield(ending)
            except asyncio.CancelledError as error:
                cancelled = error
        ending.result()
        if cancelled is not None:
            raise cancelled

    def _write_lock(self) -> asyncio.Lock:
        return self._writes().lock

    @asynccontextmanager
    async def join(self, conn: AsyncConnection | None) -> AsyncIterator[AsyncConnection]:
        """The caller's transaction when it passes one, else a new write transaction.

        Lets one use case run either on its own or as part of a larger unit of work (a saga step
        whose effects must commit with the saga's progress). Joining never commits or rolls
        back: that stays with whoever opened the transaction.
        """
        if conn is not None:
            yield conn
            return
        async with self.write() as own:
            yield own

    async def ping(self) -> None:
        if self.reachability is not None:
            self.reachability.check()
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    def pool_status(self) -> dict[str, int]:
        pool: Any = self.engine.pool
        status = {"size": 0, "checked_out": 0, "overflow": 0, "idle": 0}
        for name, key in (
            ("size", "size"),
            ("checked_out", "checkedout"),
            ("overflow", "overflow"),
            ("idle", "checkedin"),
        ):
            fn = getattr(pool, key, None)
            if callable(fn):
                status[name] = int(fn())
        return status

    async def dispose(self) -> None:
        if self.reachability is not None:
            await self.reachability.close()
        await self.signals.aclose()
        for writes in list(self._loop_writes.values()):
            if writes.writer is not None:
                writer, writes.writer = writes.writer, None
                await writer.aclose()
        if self.replicas is not None:
            await self.replicas.dispose()
        await self.engine.dispose()


def create_database(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 10,
    pool_timeout_s: float = 5.0,
    statement_timeout_s: float = 10.0,
    echo: bool = False,
    replica_urls: list[str] | None = None,
    replica_max_lag_s: float = 5.0,
    replica_token_wait_s: float = 0.05,
    replica_hook: ReplicaHook | None = None,
    probe_interval_s: float = 0.0,
    probe_timeout_s: float = 0.5,
    probe_failures: int = 2,
    sqlite_synchronous: str = "NORMAL",
) -> Database:
    """Build the engine for `url` with the per-dialect settings this project relies on, and one
    autocommit engine per read replica (PostgreSQL only).

    `sqlite_synchronous`: NORMAL (the default) keeps every commit across a process crash, not
    across a power loss or an OS crash; FULL fsyncs the WAL at every commit (ADR 0058)."""
    if sqlite_synchronous.upper() not in SQLITE_SYNCHRONOUS:
        raise ValueError(
            f"sqlite_synchronous must be one of {SQLITE_SYNCHRONOUS}, not {sqlite_synchronous!r}"
        )
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": False}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": statement_timeout_s}
        if parsed.database and parsed.database != ":memory:":
            kwargs.update(pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout_s)
        # Every scope below ends its transaction itself (read: rollback, write: commit or rollback),
        # and a Connection closed mid-transaction rolls it back before returning to the pool, so the
        # pool's own reset-on-return ROLLBACK is a second, empty one: on aiosqlite it still costs a
        # round trip to the driver's thread on every checkin.
        kwargs["pool_reset_on_return"] = None
    else:
        kwargs.update(pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout_s)
        if parsed.get_driver_name() == "asyncpg":
            timeout_ms = str(int(statement_timeout_s * 1000))
            kwargs["connect_args"] = {
                "server_settings": {"statement_timeout": timeout_ms, "application_name": "mercato"},
                "timeout": pool_timeout_s,
            }
    engine = create_async_engine(parsed, **kwargs)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, busy_timeout_s=statement_timeout_s, synchronous=sqlite_synchronous)
    replicas = None
    if replica_urls:
        if engine.dialect.name != "postgresql":
            raise ValueError("read replicas need PostgreSQL")
        replica_kwargs = {k: v for k, v in kwargs.items() if k != "echo"}
        replicas = ReplicaSet(
            [
                (make_url(u).render_as_string(hide_password=True), _replica_engine(u, replica_kwargs))
                for u in replica_urls
            ],
            max_lag_s=replica_max_lag_s,
            token_wait_s=replica_token_wait_s,
            hook=replica_hook,
        )
    reachability = None
    if probe_interval_s > 0 and parsed.get_driver_name() == "asyncpg":
        reachability = Reachability(
            engine, interval_s=probe_interval_s, timeout_s=probe_timeout_s, failures=probe_failures
        )
    return Database(
        engine, write_queue_timeout_s=statement_timeout_s, replicas=replicas, reachability=reachability
    )


def _replica_engine(url: str, kwargs: dict[str, Any]) -> AsyncEngine:
    return create_async_engine(url, isolation_level="AUTOCOMMIT", **kwargs)


LoopLocks = weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]


def loop_lock(locks: LoopLocks) -> asyncio.Lock:
    """The running loop's lock in `locks`, made on first use: a database object may outlive an
    event loop (tests, CLI commands run in turn), and an asyncio.Lock belongs to one loop."""
    loop = asyncio.get_running_loop()
    lock = locks.get(loop)
    if lock is None:
        lock = locks[loop] = asyncio.Lock()
    return lock


def prepare_sqlite_connection(
    dbapi_connection: Any, *, busy_timeout_s: float, synchronous: str = "NORMAL"
) -> None:
    """Every SQLite connection of ours: WAL, no fsync per commit (unless `synchronous` is FULL),
    foreign keys, a busy timeout, and transaction control taken from the driver so BEGIN is ours
    to emit."""
    if synchronous.upper() not in SQLITE_SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {SQLITE_SYNCHRONOUS}, not {synchronous!r}")
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    cursor.close()


def _configure_sqlite(engine: AsyncEngine, *, busy_timeout_s: float, synchronous: str) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        prepare_sqlite_connection(dbapi_connection, busy_timeout_s=busy_timeout_s, synchronous=synchronous)
        register_loop_connection(
            getattr(dbapi_connection, "driver_connection", None),
            busy_timeout_ms=int(busy_timeout_s * 1000),
            synchronous=synchronous,
        )

    @event.listens_for(sync_engine, "invalidate")
    def _on_invalidate(dbapi_connection: Any, _record: ConnectionPoolEntry, _error: Any) -> None:
        # SQLite closes a connection that still has a statement running (a cursor that a cancelled
        # task never fetched, kept alive by its traceback) only in name: the "zombie" keeps its
        # transaction, and with it the database's write lock, until the garbage collector frees
        # that cursor. A ROLLBACK first (queued on the driver's thread after whatever runs there)
        # ends the transaction whatever the cursors; on a connection already lost it fails: fine.
        # Outside a greenlet (the garbage collector's clean-up) the driver cannot be awaited.
        if in_greenlet():
            with contextlib.suppress(Exception):
                dbapi_connection.rollback()

    _commit_on_loop_when_safe(sync_engine.dialect)

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = bool(conn.get_execution_options().get(_WRITE_OPTION))
        sql = "BEGIN IMMEDIATE" if immediate else "BEGIN"
        driver = conn.connection.driver_connection
        state = loop_state(driver)
        if state is not None and state.dedicated and state.raw.in_transaction:
            return  # the writer's transaction, begun on the driver (sqlite_writer.py): SQLAlchemy joins it
        # On the loop's thread when the write lock is free: no hop at all (sqlite_loop.py).
        if state is not None and not conn.connection.dbapi_connection._execute_mutex.locked():
            try:
                if begin_on_loop(state, immediate=immediate):
                    return
            except sqlite3.Error as error:
                raise DBAPIError.instance(sql, (), error, sqlite3.Error) from error
        if hasattr(driver, "execute_fetchall"):
            # aiosqlite: one hop to its thread. Through SQLAlchemy's cursor the BEGIN took three
            # (open the cursor, execute, close it), each a GIL hand-off that cost more than the
            # statement; a write transaction's BEGIN and COMMIT were most of an empty one's cost
            # (ADR 0058). Like asyncpg's BEGIN, it is no longer a cursor execute.
            try:
                await_(driver.execute_fetchall(sql))
            except sqlite3.Error as error:
                # What SQLAlchemy raises for it through a cursor ("database is locked" after the
                # busy timeout: OperationalError), so callers and the outage mapping see one type.
                raise DBAPIError.instance(sql, (), error, sqlite3.Error) from error
            if state is not None:
                began_on_thread(state, immediate=immediate)
        else:
            conn.exec_driver_sql(sql)


def _commit_on_loop_when_safe(dialect: Any) -> None:
    """COMMIT on the loop's thread when `commit_on_loop` says it cannot block it (WAL, NORMAL, not
    the checkpoint's turn), else on aiosqlite's thread as before; ROLLBACK on the thread, ending
    the transaction's hold on the write lock. The dialect has no event that replaces its commit,
    so this one engine's dialect gets wrapped `do_commit` and `do_rollback`."""
    do_commit = dialect.do_commit
    do_rollback = dialect.do_rollback

    def _do_commit(dbapi_connection: Any) -> None:
        state = loop_state(getattr(dbapi_connection, "driver_connection", None))
        if state is not None and not dbapi_connection._execute_mutex.locked() and commit_on_loop(state):
            return
        if state is not None and state.dedicated:
            # The writer's auto-checkpoint is off: its thread commits checkpoint (sqlite_writer.py).
            try:
                await_(dbapi_connection.driver_connection._execute(commit_on_thread(state)))
            except Exception as error:  # noqa: BLE001 - re-raised as the adapter's DB-API error
                dbapi_connection._handle_exception(error)
            return
        do_commit(dbapi_connection)

    def _do_rollback(dbapi_connection: Any) -> None:
        # On aiosqlite's thread, always: a cancelled call may still be running there.
        state = loop_state(getattr(dbapi_connection, "driver_connection", None))
        if state is not None:
            state.write_locked = False
        do_rollback(dbapi_connection)

    dialect.do_commit = _do_commit
    dialect.do_rollback = _do_rollback
