"""The default pool keeps the connections it opens (ADR 0084): a burst up to the pool's ceiling and a
second one use the same PostgreSQL sessions, instead of closing overflow connections at check-in and
forking new backends (each with asyncpg's type introspection and every statement prepared again)."""

from __future__ import annotations

import contextlib

from sqlalchemy import text

from mercato.bootstrap import build_database
from mercato.config import DatabaseSettings, Environment, Settings


async def _burst(db: object, width: int) -> set[int]:
    """`width` connections held at once; the backend pid of each."""
    async with contextlib.AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(db.engine.connect()) for _ in range(width)]  # type: ignore[attr-defined]
        return {int(await conn.scalar(text("SELECT pg_backend_pid()"))) for conn in conns}


async def test_a_second_burst_to_the_ceiling_reuses_every_session(pg_url: str) -> None:
    settings = Settings(env=Environment.TEST, database=DatabaseSettings(url=pg_url, probe_interval_s=0))
    ceiling = settings.database.pool_size + settings.database.max_overflow
    db = build_database(settings)
    try:
        first = await _burst(db, ceiling)
        second = await _burst(db, ceiling)
        assert len(first) == ceiling
        assert second == first  # not one backend closed and reopened between the bursts
        assert db.pool_status()["idle"] == ceiling
    finally:
        await db.dispose()
