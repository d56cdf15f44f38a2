"""`classify_outage` on the errors real servers raise: a private PostgreSQL node stopped, killed, failed over,
timed out; a SQLite file locked past its busy timeout. And what must stay a 500: constraint violations, bugs.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, MissingGreenlet

from mercato.cluster import PostgresNode
from mercato.kit.storage import Database, create_database
from mercato.kit.storage.outages import Outage, classify_outage


async def _failure(db: Database, sql: str = "SELECT 1", *, write: bool = False) -> BaseException:
    try:
        async with db.write() if write else db.read() as conn:
            await conn.execute(text(sql))
    except Exception as exc:
        return exc
    raise AssertionError(f"{sql!r} did not fail")


@pytest.fixture
async def db(private_pg: PostgresNode, pg_node_url: str) -> AsyncIterator[Database]:
    database = create_database(
        pg_node_url, pool_size=2, max_overflow=0, pool_timeout_s=0.3, statement_timeout_s=0.5
    )
    try:
        yield database
    finally:
        await database.dispose()


async def test_a_stopped_server_refuses_connections(private_pg: PostgresNode, db: Database) -> None:
    await asyncio.to_thread(private_pg.stop)
    assert classify_outage(await _failure(db)) == Outage("database", "connection-refused", 2.0, False)


async def test_a_pooled_connection_that_outlived_its_server_is_a_lost_connection(
    private_pg: PostgresNode, db: Database
) -> None:
    async with db.read() as conn:  # one pooled connection
        await conn.execute(text("SELECT 1"))
    await asyncio.to_thread(private_pg.restart)
    outage = classify_outage(await _failure(db))
    assert outage is not None
    assert (outage.dependency, outage.reason) == ("database", "connection-lost")
    async with db.read() as conn:  # the pool dropped the dead connections: the next call works
        assert (await conn.execute(text("SELECT 1"))).scalar() == 1


async def test_a_fast_shutdown_mid_statement_leaves_the_outcome_unknown(
    private_pg: PostgresNode, db: Database
) -> None:
    failing = asyncio.create_task(_failure(db, "SELECT pg_sleep(0.4)"))
    await asyncio.sleep(0.15)
    await asyncio.to_thread(private_pg.stop)
    outage = classify_outage(await failing)
    assert outage is not None
    assert outage.dependency == "database"
    assert outage.reason in ("shutting-down", "connection-lost")
    assert outage.outcome_unknown


async def test_a_crash_mid_statement_is_a_lost_connection(private_pg: PostgresNode, db: Database) -> None:
    failing = asyncio.create_task(_failure(db, "SELECT pg_sleep(0.4)"))
    await asyncio.sleep(0.15)
    await asyncio.to_thread(private_pg.kill)
    outage = classify_outage(await failing)
    assert outage is not None
    assert outage.reason in ("connection-lost", "shutting-down")
    assert outage.outcome_unknown


async def test_statement_timeout(db: Database) -> None:
    assert classify_outage(await _failure(db, "SELECT pg_sleep(2)")) == Outage(
        "database", "statement-timeout", 1.0, False
    )


async def _write_on_a_read_only_primary(db: Database) -> None:
    # What a demoted primary (or a standby the pool reconnected to) answers every write.
    async with db.write() as conn:
        await conn.execute(text("SET TRANSACTION READ ONLY"))
        await conn.execute(text("CREATE TABLE never_made (x int)"))


async def test_a_read_only_primary_is_a_failover(db: Database) -> None:
    with pytest.raises(Exception) as caught:
        await _write_on_a_read_only_primary(db)
    assert classify_outage(caught.value) == Outage("database", "failover", 2.0, False)


async def test_pool_exhausted(db: Database) -> None:
    held = [await db.engine.connect() for _ in range(2)]
    try:
        assert classify_outage(await _failure(db)) == Outage("database", "pool-timeout", 1.0, False)
    finally:
        for conn in held:
            await conn.close()


async def test_a_server_shutting_down_refuses_new_sessions(private_pg: PostgresNode, db: Database) -> None:
    holder = await asyncpg.connect(private_pg.dsn("mercato"))
    try:
        await asyncio.to_thread(private_pg.stop, mode="smart", wait=False)  # waits for `holder` to leave
        await asyncio.sleep(0.2)
        assert classify_outage(await _failure(db)) == Outage("database", "shutting-down", 2.0, False)
    finally:
        await holder.close()


async def test_sqlite_locked_past_its_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    db = create_database(f"sqlite+aiosqlite:///{path}", statement_timeout_s=0.2)
    try:
        async with db.write() as conn:
            await conn.execute(text("CREATE TABLE t (x int)"))
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's writer holds the file's write lock
        try:
            exc = await _failure(db, "INSERT INTO t VALUES (1)", write=True)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert classify_outage(exc) == Outage("database", "locked", 1.0, False)
    finally:
        await db.dispose()


async def test_a_connection_lost_inside_a_write_transaction_surfaces_as_the_outage(db: Database) -> None:
    """The write path's cleanup must not touch the invalidated connection: it used to ask for its `info`,
    which reconnects synchronously and raised MissingGreenlet over the outage."""

    async def write_on_a_terminated_connection() -> None:
        async with db.write() as conn:
            db.signals.after_commit(conn, "orders")
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
            async with db.read() as other:
                await other.execute(text(f"SELECT pg_terminate_backend({pid})"))
            await asyncio.sleep(0.1)
            await conn.execute(text("SELECT 1"))

    with pytest.raises(Exception) as caught:
        await write_on_a_terminated_connection()
    assert not isinstance(caught.value, MissingGreenlet), caught.value
    outage = classify_outage(caught.value)
    assert outage is not None
    assert (outage.dependency, outage.reason) == ("database", "connection-lost")


def test_a_shutdown_notice_read_before_the_close_is_a_lost_connection() -> None:
    """asyncpg's words when the server's FATAL arrived on an idle pooled connection and the next
    statement finds the protocol still consuming it (seen in `mercato lab outage`)."""
    from asyncpg.exceptions._base import InternalClientError

    error = InternalClientError("cannot switch to state 12; another operation (2) is in progress")
    assert classify_outage(error) == Outage("database", "connection-lost", 2.0, False)
    # Another state is a connection used by two tasks at once: a bug, not an outage.
    assert (
        classify_outage(
            InternalClientError("cannot switch to state 12; another operation (11) is in progress")
        )
        is None
    )


async def test_what_is_not_an_outage_stays_unclassified(db: Database) -> None:
    async with db.write() as conn:
        await conn.execute(text("CREATE TEMP TABLE u (x int PRIMARY KEY)"))
        await conn.execute(text("INSERT INTO u VALUES (1)"))
        with pytest.raises(IntegrityError) as caught:
            await conn.execute(text("INSERT INTO u VALUES (1)"))
    assert classify_outage(caught.value) is None
    assert classify_outage(ValueError("a bug")) is None
    # An OSError of our own code (a file, say) is no database outage.
    with pytest.raises(OSError) as not_found:
        Path("/nonexistent/dir/file").read_bytes()  # noqa: ASYNC240 - the error, not the I/O, is the point
    assert classify_outage(not_found.value) is None
    # Nor one raised by our code inside a database block: it passed SQLAlchemy's frames on its way out.
    with pytest.raises(OSError) as in_block:
        async with db.read():
            Path("/nonexistent/dir/file").read_bytes()  # noqa: ASYNC240 - the error, not the I/O, is the point
    assert classify_outage(in_block.value) is None
    syntax = await _failure(db, "SELEC 1")
    assert classify_outage(syntax) is None


def test_a_refused_connection_on_uvloop_is_the_databases() -> None:
    """`mercato api` (uvicorn) and `mercato worker` run on uvloop, whose socket callbacks raise the bare
    ConnectionRefusedError from `uvloop.loop`, not from asyncio: still a database outage, not a 500."""
    import socket

    import uvloop

    with socket.socket() as probe:  # a port nothing listens on: the connect is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def refused() -> BaseException:
        database = create_database(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/none", pool_size=1)
        try:
            return await _failure(database)
        finally:
            await database.dispose()

    failure = uvloop.run(refused())
    assert isinstance(failure, ConnectionRefusedError), repr(failure)  # bare: SQLAlchemy re-raises it as is
    tb, raised_in = failure.__traceback__, ""
    while tb is not None:
        raised_in, tb = str(tb.tb_frame.f_globals.get("__name__", "")), tb.tb_next
    assert raised_in.startswith("uvloop"), raised_in  # the case under test: uvloop raised it
    assert classify_outage(failure) == Outage("database", "connection-refused", 2.0, False)
