"""``mercato lab delivery``: at-least-once delivery, killed consumers and duplicates; nothing applied twice.

Hypothesis (guide §14, §21): with at-least-once delivery a consumer sees duplicates (redeliveries
after a crash, deliberate duplicate publishes, a rewound group), but
- the inbox (message id recorded in the handler's transaction) applies each message exactly once;
- a projector (checkpoint advanced in the apply's transaction) applies each message exactly once;
so "duplicates seen" > 0 while "duplicates applied" = 0 and no message is lost.

Run: N events are published to the embedded SQL log, plus D deliberate re-publishes of already
published events (same ids). Two workers of each kind run concurrently and are killed (task
cancelled, as SIGKILL would: mid-transaction, with deliveries read and not acknowledged) at random
moments and restarted, until all N are applied; then the consumer group is rewound to offset zero
(every message redelivered). The effects table has no unique key, so any double apply would show.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table as RichTable
from sqlalchemy import Column, Integer, MetaData, String, Table, Uuid, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.bench.harness import OutOption, RunFolder
from mercato.bootstrap import SCRIPT_LOCATION
from mercato.kit.ids import new_id
from mercato.kit.messaging import Consumer, Message, NullMessagingHook, SqlLogStream
from mercato.kit.projections import Projection, Projector
from mercato.kit.storage import Database, create_database
from mercato.kit.storage.migrations import upgrade

__all__ = ["DeliveryResult", "delivery_command", "run_experiment"]

TOPIC = "lab.delivery"
_meta = MetaData()
effects = Table(
    "lab_delivery_effects",
    _meta,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("runner", String(20), nullable=False),
    # Deliberately not unique: a double apply must be visible, not refused.
    Column("message_id", Uuid, nullable=False),
)


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    runner: str
    messages: int
    duplicate_publishes: int
    kills: int
    handled: int
    duplicates_seen: int
    duplicates_applied: int
    missing: int
    seconds: float


class _SeenHook(NullMessagingHook):
    def __init__(self) -> None:
        self.dedup_hits = 0

    def consumer_dedup_hit(self, *, group: str, topic: str) -> None:
        self.dedup_hits += 1


async def _counts(db: Database, runner: str) -> tuple[int, int]:
    async with db.read() as conn:
        total, distinct = (
            await conn.execute(
                select(func.count(), func.count(func.distinct(effects.c.message_id))).where(
                    effects.c.runner == runner
                )
            )
        ).one()
    return int(total), int(distinct)


async def _chaos(
    make_pass: Callable[[int], Callable[[], Awaitable[int]]],
    done: Callable[[], Awaitable[bool]],
    rng: random.Random,
    *,
    workers: int = 2,
    kill_after_s: tuple[float, float] = (0.005, 0.05),
    max_kills: int = 40,
) -> int:
    """Run `workers` loops of passes; kill one at random every few ms, restart it; until `done`."""
    kills = 0
    generation = 0

    async def loop(run_once: Callable[[], Awaitable[int]]) -> None:
        while True:
            if not await run_once():
                await asyncio.sleep(0.005)

    tasks = {}
    for w in range(workers):
        tasks[w] = asyncio.create_task(loop(make_pass(generation)))
        generation += 1
    try:
        while not await done():
            await asyncio.sleep(rng.uniform(*kill_after_s))
            if kills < max_kills:
                victim = rng.randrange(workers)
                tasks[victim].cancel()
                await asyncio.gather(tasks[victim], return_exceptions=True)
                kills += 1
                tasks[victim] = asyncio.create_task(loop(make_pass(generation)))
                generation += 1
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    return kills


async def run_experiment(
    db: Database, *, messages: int = 2000, duplicates: int = 300, seed: int = 7
) -> list[DeliveryResult]:
    rng = random.Random(seed)
    async with db.write() as conn:
        await conn.run_sync(effects.create, checkfirst=True)
    # A short visibility timeout: a killed consumer's batch is redelivered quickly.
    stream = SqlLogStream(db, partitions=4, visibility_timeout_s=0.3, max_attempts=1000)
    batch_id = new_id().hex[:8]
    published = [
        Message(
            id=new_id(),
            source="lab",
            type="lab.delivery.happened",
            subject=f"key-{i % 64}",
            time=datetime.now(UTC),
            data={"n": i},
            topic=f"{TOPIC}.{batch_id}",
        )
        for i in range(messages)
    ]
    topic = published[0].topic
    for start in range(0, messages, 500):
        await stream.publish(published[start : start + 500])
    # Deliberate duplicate publishes (a relay that retried after a lost ack): same ids again.
    await stream.publish(rng.sample(published, duplicates))
    results = []

    # ---- consumer + inbox ----
    hook = _SeenHook()

    async def record(conn: AsyncConnection, message: Message) -> None:
        await conn.execute(insert(effects).values(runner="inbox", message_id=message.id))
        await asyncio.sleep(0)  # a yield inside the transaction: a kill can land here

    handled = 0

    def consumer_pass(generation: int) -> Callable[[], Awaitable[int]]:
        consumer = Consumer(
            db,
            stream,
            topic=topic,
            group=f"lab-{batch_id}",
            name=f"c{generation}",
            handler=record,
            max_messages=50,
            hook=hook,
        )

        async def run() -> int:
            nonlocal handled
            n = await consumer.run_once()
            handled += n
            return n

        return run

    async def inbox_done() -> bool:
        return (await _counts(db, "inbox"))[1] >= messages

    started = time.perf_counter()
    kills = await _chaos(consumer_pass, inbox_done, rng)
    # Deliberate redelivery of everything: rewind the group and consume again.
    await stream.replay(topic, f"lab-{batch_id}", from_offset=0)
    run_again = consumer_pass(10_000)
    while await stream.lag(topic, f"lab-{batch_id}"):
        if not await run_again():
            await asyncio.sleep(0.05)
    total, distinct = await _counts(db, "inbox")
    results.append(
        DeliveryResult(
            "consumer + inbox",
            messages,
            duplicates,
            kills,
            handled,
            hook.dedup_hits,
            total - distinct,
            messages - distinct,
            time.perf_counter() - started,
        )
    )

    # ---- projector + checkpoint ----
    reads = 0

    async def project(conn: AsyncConnection, message: Message, tables: Mapping[str, Table]) -> None:
        nonlocal reads
        reads += 1
        await conn.execute(insert(tables[effects.name]).values(runner="projector", message_id=message.id))
        await asyncio.sleep(0)

    projection = Projection(name=f"lab-{batch_id}", topics=(topic,), tables=(effects,), apply=project)

    def projector_pass(generation: int) -> Callable[[], Awaitable[int]]:
        return Projector(db, projection, batch_size=50).run_once

    async def projector_done() -> bool:
        return (await _counts(db, "projector"))[1] >= messages

    started = time.perf_counter()
    kills = await _chaos(projector_pass, projector_done, rng)
    total, distinct = await _counts(db, "projector")
    results.append(
        DeliveryResult(
            "projector + checkpoint",
            messages,
            duplicates,
            kills,
            reads,
            reads - distinct,
            total - distinct,
            messages - distinct,
            time.perf_counter() - started,
        )
    )
    return results


def table(results: list[DeliveryResult]) -> RichTable:
    out = RichTable(title="At-least-once delivery under kills and duplicates")
    for name in (
        "runner", "messages", "duplicate publishes", "kills", "handled / applies tried",
        "duplicates seen", "duplicates applied", "missing", "seconds",
    ):  # fmt: skip
        out.add_column(name)
    for r in results:
        out.add_row(
            r.runner,
            str(r.messages),
            str(r.duplicate_publishes),
            str(r.kills),
            str(r.handled),
            str(r.duplicates_seen),
            str(r.duplicates_applied),
            str(r.missing),
            f"{r.seconds:.1f}",
        )
    return out


def delivery_command(
    messages: Annotated[int, typer.Option(min=10, max=1_000_000, help="Events to publish")] = 2000,
    duplicates: Annotated[int, typer.Option(min=0, help="Deliberate duplicate publishes")] = 300,
    database_url: Annotated[
        str | None, typer.Option(help="Database (default: a fresh SQLite file in a temp dir)")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for kill timing and duplicate choice")] = 7,
    out: OutOption = None,
) -> None:
    """Kill consumers mid-batch, duplicate deliveries on purpose: duplicates seen vs applied (must be 0)."""

    async def main(url: str) -> list[DeliveryResult]:
        db = create_database(url, pool_size=10)
        try:
            return await run_experiment(
                db, messages=messages, duplicates=min(duplicates, messages), seed=seed
            )
        finally:
            await db.dispose()

    with tempfile.TemporaryDirectory() as tmp:
        url = database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'delivery.db'}"
        upgrade(SCRIPT_LOCATION, url)  # runs its own event loop: before ours starts
        results = asyncio.run(main(url))
    Console(width=160).print(table(results))
    RunFolder.open("delivery", out).record(
        data={"results": [asdict(r) for r in results]},
        tables=[table(results)],
        verdict=[
            f"{r.runner}: {r.duplicates_seen} duplicates seen, {r.duplicates_applied} applied, "
            f"{r.missing} missing (both must be 0)"
            for r in results
        ],
        console=Console(stderr=True),
        held=not any(r.duplicates_applied or r.missing for r in results),
    )
    if any(r.duplicates_applied or r.missing for r in results):
        raise typer.Exit(1)
