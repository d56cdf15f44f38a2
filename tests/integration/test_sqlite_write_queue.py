"""SQLite's writers of one process queue on an asyncio lock instead of polling in SQLite's busy handler.

What must hold: while one write transaction is open, the next writer of the same process waits without a
connection or a SQLite transaction of its own, and takes the lock the moment the first commits, in arrival
order; a write that cannot get in line in time (a nested write: it would wait for itself) falls back to
SQLite's own busy timeout and fails like before instead of hanging forever; PostgreSQL is untouched.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from mercato.kit.storage import create_database


async def _table(url: str) -> None:
    db = create_database(url)
    async with db.write() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS t (n INTEGER)"))
    await db.dispose()


async def test_writers_of_one_process_take_the_lock_in_turn_without_holding_connections(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'q.db'}"
    await _table(url)
    db = create_database(url)
    order: list[int] = []
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def writer(n: int) -> None:
        async with db.write() as conn:
            order.append(n)
            await conn.execute(text("INSERT INTO t (n) VALUES (:n)"), {"n": n})
            if n == 0:
                first_in.set()
                await release.wait()

    try:
        first = asyncio.create_task(writer(0))
        await first_in.wait()
        others = [asyncio.create_task(writer(n)) for n in range(1, 6)]
        await asyncio.sleep(0.1)
        assert order == [0], "the others wait their turn"
        assert db.pool_status()["checked_out"] == 1, "and hold no connection while they wait"
        release.set()
        await asyncio.gather(first, *others)
        assert order == [0, 1, 2, 3, 4, 5], "in arrival order"
        async with db.read() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 6
    finally:
        await db.dispose()


async def test_a_nested_write_falls_back_to_the_busy_timeout_instead_of_waiting_forever(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'n.db'}"
    await _table(url)
    db = create_database(url, statement_timeout_s=0.2)
    loop = asyncio.get_running_loop()
    try:
        async with db.write() as outer:
            await outer.execute(text("INSERT INTO t (n) VALUES (1)"))
            started = loop.time()
            with pytest.raises(OperationalError, match="locked"):
                async with db.write() as inner:
                    await inner.execute(text("INSERT INTO t (n) VALUES (2)"))
            assert loop.time() - started < 5.0
        async with db.read() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 1
    finally:
        await db.dispose()


async def test_postgresql_writers_do_not_queue(pg_url: str) -> None:
    db = create_database(pg_url)
    entered = 0
    both_in = asyncio.Event()

    async def writer() -> None:
        nonlocal entered
        async with db.write() as conn:
            await conn.execute(text("SELECT 1"))
            entered += 1
            if entered == 2:
                both_in.set()
            await asyncio.wait_for(both_in.wait(), timeout=5.0)

    try:
        await asyncio.gather(writer(), writer())  # would time out if the second waited for the first
    finally:
        await db.dispose()
