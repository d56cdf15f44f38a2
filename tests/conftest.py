"""Shared fixtures: real databases (SQLite file and a throwaway PostgreSQL database per run)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest
from hypothesis import settings as hypothesis_settings
from sqlalchemy import text

from mercato.bootstrap import SCRIPT_LOCATION, Container, build_container
from mercato.cluster import PostgresNode, RedisNode
from mercato.config import AuthSettings, DatabaseSettings, Environment, Settings
from mercato.kit.clock import ManualClock
from mercato.kit.storage.migrations import upgrade
from tests.tables import emptiable_tables

# Hypothesis's per-example deadline measures the machine, not the property: on a shared 2-core CI box
# an example can wait its turn for 300 ms. Properties keep their example counts; time is not judged.
hypothesis_settings.register_profile("mercato", deadline=None)
hypothesis_settings.load_profile("mercato")

PG_ADMIN_DSN = os.environ.get("MERCATO_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
# Shared PostgreSQL servers: each session names its test databases with its own prefix.
PG_TEST_PREFIX = os.environ.get("MERCATO_TEST_PG_PREFIX", "mercato_test")
TEST_SECRET = "test-secret-that-is-long-enough-0123456789abcdef"


def _pg_host_part() -> str:
    return PG_ADMIN_DSN.split("://", 1)[1].rsplit("/", 1)[0]


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def scratch_pg_database(label: str = "") -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database named `<PG_TEST_PREFIX>_<label><random>`,
    dropped (connections and all) when the block ends."""
    name = f"{PG_TEST_PREFIX}_{label}{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://{_pg_host_part()}/{name}"
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database made for this test run, migrated to head, dropped at the end."""
    with scratch_pg_database() as url:
        upgrade(SCRIPT_LOCATION, url)
        yield url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("sqlite") / "mercato.db"
    url = f"sqlite+aiosqlite:///{path}"
    upgrade(SCRIPT_LOCATION, url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over both real backends."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


def make_settings(url: str, **overrides: object) -> Settings:
    return Settings(
        env=Environment.TEST,
        database=DatabaseSettings(url=url, pool_size=20, max_overflow=40),
        auth=AuthSettings(secret=TEST_SECRET, argon2_time_cost=1, argon2_memory_kib=8192),  # type: ignore[arg-type]
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture
def clock() -> ManualClock:
    from datetime import UTC, datetime

    return ManualClock(datetime(2026, 11, 25, 12, 0, tzinfo=UTC))


@pytest.fixture
async def container(database_url: str, clock: ManualClock) -> AsyncIterator[Container]:
    """A container on a clean database: every table is emptied after the test."""
    built = build_container(make_settings(database_url), clock=clock)
    assert built.signing_keys is not None
    await built.signing_keys.ready()  # the first key, as the API's startup creates it
    try:
        yield built
    finally:
        async with built.db.write() as conn:
            for table in emptiable_tables():
                await conn.execute(text(f'DELETE FROM "{table.name}"'))
        await built.close()


# --- private servers for fault tests (never the shared ones) ------------------------------------------


@pytest.fixture(scope="session")
def pg_node() -> Iterator[PostgresNode]:
    """A private PostgreSQL 15 cluster for this run (initdb in a tmp folder, a free port), destroyed after."""
    node = PostgresNode.create()
    try:
        yield node
    finally:
        node.destroy()


@pytest.fixture(scope="session")
def pg_node_url(pg_node: PostgresNode) -> str:
    """A migrated database on the private node."""
    url = pg_node.create_database("mercato")
    upgrade(SCRIPT_LOCATION, url)
    return url


@pytest.fixture
def private_pg(pg_node: PostgresNode, pg_node_url: str) -> Iterator[PostgresNode]:
    """The private node, running when the test starts and again after it, whatever the test did to it."""
    if not pg_node.is_running():
        pg_node.start()
    yield pg_node
    if not pg_node.is_running():
        pg_node.start()


@pytest.fixture
def redis_node() -> Iterator[RedisNode]:
    """A private redis-server on a free port, for one test to stop and start."""
    node = RedisNode.create()
    try:
        yield node
    finally:
        node.destroy()
