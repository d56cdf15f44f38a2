"""The projector: checkpoint and effect commit together, lag is measured, rebuild swaps atomically.

A generic counting projection (its own table, outside the app's metadata) over messages published
to the real SQL log, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.bootstrap import Container
from mercato.kit.ids import new_id
from mercato.kit.messaging import Message
from mercato.kit.projections import Projection, Projector, PrometheusProjectionHook
from mercato.kit.storage import Database

TOPIC = "test.counts"

_meta = MetaData()
counts = Table(
    "test_projection_counts",
    _meta,
    Column("key", String(50), primary_key=True),
    Column("applied", Integer, nullable=False),
    Column("total", Integer, nullable=False),
)


class Crash(Exception):
    """Stands for the process dying between applying and committing."""


class Counting:
    """Counts applications per key; `crash_at` makes the n-th apply of a pass raise after the
    previous ones were written in the same transaction; `block` parks an apply forever."""

    def __init__(self) -> None:
        self.crash_at: int | None = None
        self.block_at: int | None = None
        self.calls = 0
        self.blocked = asyncio.Event()

    async def apply(self, conn: AsyncConnection, message: Message, tables: Mapping[str, Table]) -> None:
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise Crash("killed between apply and commit")
        if self.block_at is not None and self.calls == self.block_at:
            self.blocked.set()
            await asyncio.Event().wait()
        table = tables[counts.name]
        amount = int(message.data["amount"])
        result = await conn.execute(
            update(table)
            .where(table.c.key == message.subject)
            .values(applied=table.c.applied + 1, total=table.c.total + amount)
        )
        if result.rowcount == 0:
            await conn.execute(insert(table).values(key=message.subject, applied=1, total=amount))


@pytest.fixture
async def db(container: Container) -> AsyncIterator[Database]:
    async with container.db.write() as conn:
        await conn.run_sync(counts.create, checkfirst=True)
    try:
        yield container.db
    finally:
        async with container.db.write() as conn:
            await conn.run_sync(counts.drop, checkfirst=True)


async def publish(container: Container, n: int, *, keys: int = 5) -> None:
    await container.stream.publish(
        [
            Message(
                id=new_id(),
                source="test",
                type="test.counts.added",
                subject=f"k{i % keys}",
                time=datetime(2026, 11, 25, 12, tzinfo=UTC),
                data={"amount": i},
                topic=TOPIC,
            )
            for i in range(n)
        ]
    )


async def rows(db: Database, table: Table = counts) -> list[tuple[str, int, int]]:
    async with db.read() as conn:
        result = await conn.execute(select(table.c.key, table.c.applied, table.c.total).order_by(table.c.key))
        return [(str(k), int(a), int(t)) for k, a, t in result]


def projector(db: Database, counting: Counting, **kw: object) -> Projector:
    projection = Projection(name="test_counts", topics=(TOPIC,), tables=(counts,), apply=counting.apply)
    return Projector(db, projection, batch_size=1000, **kw)  # type: ignore[arg-type]


EXPECTED = [(f"k{k}", 4, sum(i for i in range(20) if i % 5 == k)) for k in range(5)]


async def test_a_crash_between_apply_and_commit_applies_nothing_and_the_retry_applies_once(
    container: Container, db: Database
) -> None:
    await publish(container, 20)
    counting = Counting()
    live = projector(db, counting)
    counting.crash_at = 15  # 14 messages applied in the open transaction, then the "crash"
    with pytest.raises(Crash):
        await live.run_once()
    assert await rows(db) == []
    assert sum((await live.positions()).values()) == 0
    counting.crash_at = None
    assert await live.run_once() == 20
    assert await rows(db) == EXPECTED
    assert await live.run_once() == 0
    assert await rows(db) == EXPECTED


async def test_a_cancelled_pass_mid_batch_rolls_back_and_resumes_from_the_old_checkpoint(
    container: Container, db: Database
) -> None:
    await publish(container, 20)
    counting = Counting()
    live = projector(db, counting)
    counting.block_at = 9
    task = asyncio.create_task(live.run_once())
    await asyncio.wait_for(counting.blocked.wait(), timeout=5)
    task.cancel()  # the consumer is killed with 8 applies written and not committed
    with pytest.raises(asyncio.CancelledError):
        await task
    counting.block_at = None
    assert await rows(db) == []
    assert await live.run_once() == 20
    assert await rows(db) == EXPECTED


async def test_lag_counts_unapplied_messages_and_is_exported(container: Container, db: Database) -> None:
    registry = CollectorRegistry()
    live = projector(db, Counting(), hook=PrometheusProjectionHook.for_registry(registry))
    assert PrometheusProjectionHook.for_registry(registry) is PrometheusProjectionHook.for_registry(registry)
    await publish(container, 12)
    assert await live.lag() == 12
    assert registry.get_sample_value("mercato_projection_lag_messages", {"projection": "test_counts"}) == 12
    await live.run_once()
    assert await live.lag() == 0
    assert registry.get_sample_value("mercato_projection_lag_messages", {"projection": "test_counts"}) == 0
    applied = registry.get_sample_value(
        "mercato_projection_applied_messages_total", {"projection": "test_counts"}
    )
    assert applied == 12


async def test_rebuild_replays_into_a_new_table_and_swaps_it_in(container: Container, db: Database) -> None:
    await publish(container, 20)
    live = projector(db, Counting())
    await live.run_once()
    before = await rows(db)
    report = await live.rebuild()
    assert report.messages == 20
    assert await rows(db) == before == EXPECTED
    # The checkpoint points past the replayed messages: nothing is applied twice afterwards.
    assert await live.lag() == 0
    await publish(container, 5)
    assert await live.run_once() == 5
    assert [a for _, a, _ in await rows(db)] == [5, 5, 5, 5, 5]
    async with db.read() as conn:
        tables = await conn.run_sync(lambda sync: set(sync.dialect.get_table_names(sync)))
    assert "test_projection_counts__rebuild" not in tables
    assert "test_projection_counts__old" not in tables


async def test_a_failed_rebuild_leaves_the_live_table_serving(container: Container, db: Database) -> None:
    await publish(container, 10)
    counting = Counting()
    live = projector(db, counting)
    await live.run_once()
    before = await rows(db)
    counting.crash_at = counting.calls + 3
    with pytest.raises(Crash):
        await live.rebuild()
    assert await rows(db) == before
    async with db.read() as conn:
        left = (await conn.execute(select(func.count()).select_from(counts))).scalar_one()
        tables = await conn.run_sync(lambda sync: set(sync.dialect.get_table_names(sync)))
    assert left == 5
    assert "test_projection_counts__rebuild" not in tables
