"""Worker CPU and statements per order of the payments ledger consumer, measured in one process.

`python src/mercato/bench/ledger_cpu.py DATABASE N BATCH` (PostgreSQL at 127.0.0.1:5432, user
postgres): creates DATABASE anew, migrates it, publishes N orders' `payment_authorized` and
`payment_captured` events on the SQL stream (shuffled across orders, each order's in order), then
runs the worker's ledger consumer (`PaymentsService.consumer`, `run_once` with `max_messages=BATCH`,
the batch a pass finds under load) until it has applied them all. Prints this process's CPU
(`time.process_time`) and the statements it sent, per order (two events), over the consuming only.
It imports only long-standing APIs, so an older `src/` can be measured with the same file through
`PYTHONPATH` (docs/benchmarks.md, "Session 11: h-led")."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
from sqlalchemy import event

from mercato.bootstrap import SCRIPT_LOCATION, build_container
from mercato.config import AuthSettings, DatabaseSettings, Environment, Settings
from mercato.kit.messaging import Message
from mercato.kit.storage.migrations import upgrade
from mercato.kit.storage.statements import add_driver_listener
from mercato.shop.payments.contracts import PAYMENT_AUTHORIZED, PAYMENT_CAPTURED, PAYMENTS_TOPIC

_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


async def _create(database: str) -> None:
    admin = await asyncpg.connect(_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()


def _event(event_type: str, order_id: str, **data: Any) -> Message:
    return Message(
        id=uuid.uuid4(),
        source="mercato/checkout",
        type=event_type,
        subject=order_id,
        time=datetime.now(UTC),
        data={"order_id": order_id, **data},
        topic=PAYMENTS_TOPIC,
        key=order_id,
    )


def _events(count: int) -> list[Message]:
    """Each order's authorization before its capture; orders interleaved as checkouts overlap."""
    pending = []
    for _ in range(count):
        order_id = str(uuid.uuid4())
        money = {"amount_minor": 2_500, "currency": "EUR"}
        pending.append(
            [
                _event(PAYMENT_AUTHORIZED, order_id, authorization_id=f"auth-{order_id}", **money),
                _event(
                    PAYMENT_CAPTURED,
                    order_id,
                    authorization_id=f"auth-{order_id}",
                    capture_id=f"cap-{order_id}",
                    **money,
                ),
            ]
        )
    rng = random.Random(7)
    out: list[Message] = []
    while pending:
        order = rng.choice(pending)
        out.append(order.pop(0))
        if not order:
            pending.remove(order)
    return out


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
        messages = _events(count + 20)
        for start in range(0, len(messages), 10):
            await container.stream.publish(messages[start : start + 10])
        consumer = container.payments.consumer(container.stream, max_messages=batch)
        # Warm-up: the first 20 orders' events (statements prepared, cursors created).
        warm = 0
        while warm < 40:
            warm += await consumer.run_once()
        engine = container.db.engine.sync_engine
        event.listen(engine, "before_cursor_execute", counted)
        remove = add_driver_listener(lambda sql: counted() if sql is not None else None)
        try:
            cpu, wall = time.process_time(), time.perf_counter()
            handled = 0
            while handled < 2 * count:
                handled += await consumer.run_once()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        finally:
            remove()
            event.remove(engine, "before_cursor_execute", counted)
    finally:
        await container.close()
    return (
        f"{count} orders ({2 * count} events), batch {batch}: {cpu / count * 1000:.2f} ms CPU per order, "
        f"{statements[0] / count:.2f} statements per order, {wall / count * 1000:.2f} ms wall per order; "
        f"load {os.getloadavg()[0]:.1f}"
    )


def main(database: str, count: int, batch: int) -> None:
    asyncio.run(_create(database))
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
    upgrade(SCRIPT_LOCATION, url)
    print(f"{database}: {asyncio.run(measure(url, count, batch))}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
