"""Worker CPU per message of the outbox relay, measured in one process.

`python src/mercato/bench/relay_cpu.py DATABASE N BATCH` (PostgreSQL at 127.0.0.1:5432, user
postgres): creates DATABASE anew, migrates it, then N/BATCH times commits BATCH messages to the
outbox (as a checkout's steps do) and runs one relay pass (`OutboxRelay.relay_once` onto the SQL
stream, the worker's relay). Prints this process's CPU (`time.process_time`) over the relay passes
only, per message and per pass, and the statements they sent per pass (docs/benchmarks.md,
"Session 11: h-wk2"). Imports only long-standing APIs, so an older
`src/` can be measured with the same file through `PYTHONPATH`."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
from sqlalchemy import event

from mercato.bootstrap import SCRIPT_LOCATION, build_container
from mercato.config import AuthSettings, DatabaseSettings, Environment, Settings
from mercato.kit.messaging import Message, Outbox, OutboxRelay
from mercato.kit.storage.migrations import upgrade
from mercato.kit.storage.statements import add_driver_listener

_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


async def _create(database: str) -> None:
    admin = await asyncpg.connect(_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()


def _message(n: int) -> Message:
    order_id = str(uuid.uuid4())
    return Message(
        id=uuid.uuid4(),
        source="mercato/checkout",
        type="order_placed",
        subject=order_id,
        time=datetime.now(UTC),
        data={"order_id": order_id, "n": n},
        topic="mercato.orders",
        key=order_id,
    )


async def measure(url: str, count: int, batch: int) -> str:
    settings = Settings(
        env=Environment.TEST,
        database=DatabaseSettings(url=url, pool_size=10, max_overflow=10, probe_interval_s=0),
        auth=AuthSettings(secret="s" * 48, argon2_time_cost=1, argon2_memory_kib=8192),  # type: ignore[arg-type]
    )
    container = build_container(settings)
    statements = [0]

    def counted(*_args: Any) -> None:
        statements[0] += 1

    try:
        relay = OutboxRelay(container.db, container.stream, batch_size=batch)
        outbox = Outbox()

        async def add(n: int) -> None:
            async with container.db.write() as conn:
                await outbox.add_many(conn, [_message(n * batch + i) for i in range(batch)])

        for n in range(20):  # warm-up: statements prepared, partitions' heads created
            await add(n)
            await relay.relay_once()
        engine = container.db.engine.sync_engine
        cpu = 0.0
        passes = count // batch
        for n in range(passes):
            await add(n)
            event.listen(engine, "before_cursor_execute", counted)
            remove = add_driver_listener(lambda sql: counted() if sql is not None else None)
            try:
                start = time.process_time()
                assert await relay.relay_once() == batch
                cpu += time.process_time() - start
            finally:
                remove()
                event.remove(engine, "before_cursor_execute", counted)
    finally:
        await container.close()
    return (
        f"{passes * batch} messages, batch {batch}: {cpu / (passes * batch) * 1000:.3f} ms CPU per message, "
        f"{cpu / passes * 1000:.2f} ms per pass, {statements[0] / passes:.2f} statements per pass; "
        f"load {os.getloadavg()[0]:.1f}"
    )


def main(database: str, count: int, batch: int) -> None:
    asyncio.run(_create(database))
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
    upgrade(SCRIPT_LOCATION, url)
    print(f"{database}: {asyncio.run(measure(url, count, batch))}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
