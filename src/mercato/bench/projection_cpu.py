"""The reporting projectors' cost per checkout, measured in one process: CPU and statements.

`python src/mercato/bench/projection_cpu.py DATABASE N [GROUP]` (PostgreSQL at 127.0.0.1:5432,
user postgres): creates DATABASE anew, migrates it, then N times publishes GROUP orders' histories
to the SQL stream (placed, payment authorized, payment captured, completed: what a checkout
publishes that the read models read) and runs one pass of each reporting projector as the worker
builds them (`workers/projections.build_projectors`: `build_projector`, batch 500). GROUP (default
5) is what one pass sees at 50 checkouts/s with the worker's 0.1 s side-job window. Prints, per
order, this process's CPU (`time.process_time`) over the passes only (not the publishing) and the
statements the passes sent. It imports only long-standing APIs, so an older `src/` can be measured
with the same file through `PYTHONPATH` (docs/benchmarks.md, "Session 11: h-proj")."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
from sqlalchemy import event

from mercato.bootstrap import SCRIPT_LOCATION, build_container, build_projector
from mercato.config import AuthSettings, DatabaseSettings, Environment, Settings
from mercato.kit.ids import new_id
from mercato.kit.messaging import Message
from mercato.kit.messaging.sql_log import add_driver_listener
from mercato.kit.storage.migrations import upgrade
from mercato.shop.reporting import PROJECTIONS

_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
_KINDS = (
    ("mercato.orders.order_placed", "mercato.orders"),
    ("mercato.payments.payment_authorized", "mercato.payments"),
    ("mercato.payments.payment_captured", "mercato.payments"),
    ("mercato.orders.order_completed", "mercato.orders"),
)


async def _create(database: str) -> None:
    admin = await asyncpg.connect(_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()


def _history(order_id: uuid.UUID, at: datetime) -> list[Message]:
    data: dict[str, Any] = {
        "order_id": str(order_id),
        "customer_id": str(uuid.uuid4()),
        "currency": "EUR",
        "total_minor": 2599,
        "items": [{"sku": "SKU-1", "product_id": str(order_id), "quantity": 1, "unit_price_minor": 2599}],
        "completed_at": at.isoformat(),
    }
    return [
        Message(
            id=new_id(),
            source="bench",
            type=kind,
            subject=str(order_id),
            time=at,
            data=data,
            topic=topic,
            key=str(order_id),
        )
        for kind, topic in _KINDS
    ]


async def measure(url: str, rounds: int, group: int) -> str:
    settings = Settings(
        env=Environment.TEST,
        database=DatabaseSettings(url=url, probe_interval_s=0),
        auth=AuthSettings(secret="s" * 48),  # type: ignore[arg-type]
    )
    container = build_container(settings)
    statements = 0
    on = False  # counting: only the passes' statements, not the publishing's

    def count(*_args: Any) -> None:
        nonlocal statements
        statements += on

    def count_driver(sql: str | None) -> None:
        nonlocal statements
        statements += on and sql is not None

    try:
        # As `workers/projections.build_projectors` builds them (batch 500), without the metrics hook.
        projectors = [build_projector(container, p, batch_size=500) for p in PROJECTIONS]
        at = datetime.now(UTC)
        for _ in range(3):  # warm-up: checkpoint rows, prepared statements
            await container.stream.publish([m for _ in range(group) for m in _history(new_id(), at)])
            for projector in projectors:
                await projector.run_once()
        event.listen(container.db.engine.sync_engine, "before_cursor_execute", count)
        remove = add_driver_listener(count_driver)
        cpu = 0.0
        applied = 0
        for _ in range(rounds):
            await container.stream.publish([m for _ in range(group) for m in _history(new_id(), at)])
            on = True
            started = time.process_time()
            for projector in projectors:
                applied += await projector.run_once()
            cpu += time.process_time() - started
            on = False
        remove()
        orders = rounds * group
        return (
            f"{orders} orders in passes of {group}: {1000 * cpu / orders:.3f} ms CPU per order, "
            f"{statements / orders:.2f} statements per order, {applied} messages applied"
        )
    finally:
        await container.close()


def main(database: str, rounds: int, group: int = 5) -> None:
    asyncio.run(_create(database))
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
    upgrade(SCRIPT_LOCATION, url)
    print(asyncio.run(measure(url, rounds, group)))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 5)
