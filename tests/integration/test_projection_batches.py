"""The reporting projections' batch handlers leave the tables exactly as applying one message at a
time would: same rows, whatever the mix of orders and events in a batch (both databases)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, select

from mercato.bootstrap import Container
from mercato.kit.messaging import Message
from mercato.shop.reporting.model import ORDER_CANCELLED, ORDER_COMPLETED, ORDER_PLACED, PAYMENT_EVENTS
from mercato.shop.reporting.projections import ORDER_SUMMARY, SALES_BY_DAY
from mercato.shop.reporting.tables import order_summary, sales_by_day

_TARGETS = {order_summary.name: order_summary, sales_by_day.name: sales_by_day}
_START = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)


def _event(rng: random.Random, order_id: uuid.UUID, event_type: str, at: datetime) -> Message:
    data: dict[str, Any] = {
        "order_id": str(order_id),
        "customer_id": str(uuid.UUID(int=order_id.int ^ 1)),
        "currency": rng.choice(["EUR", "USD"]),
        "total_minor": rng.randint(1, 10_000),
        "items": [
            {"sku": f"SKU-{n}", "product_id": str(uuid.uuid4()), "quantity": n, "unit_price_minor": 100}
            for n in range(1, rng.randint(1, 3) + 1)
        ],
    }
    topic = "mercato.payments" if event_type in PAYMENT_EVENTS else "mercato.orders"
    return Message(
        id=uuid.uuid4(),
        source="test",
        type=event_type,
        subject=str(order_id),
        time=at,
        data=data,
        topic=topic,
        key=str(order_id),
    )


def _history(rng: random.Random, orders: int) -> list[Message]:
    """Each order's events in a plausible order (placed, payments, an end), interleaved across orders,
    with a few duplicates and out-of-order times: the fold must cope, and so must the batch."""
    lanes = []
    for _ in range(orders):
        order_id = uuid.uuid4()
        kinds = [ORDER_PLACED, *rng.sample(sorted(PAYMENT_EVENTS), rng.randint(0, 3))]
        kinds.append(rng.choice([ORDER_COMPLETED, ORDER_CANCELLED, ORDER_COMPLETED]))
        if rng.random() < 0.3:
            kinds.append(rng.choice(kinds))
        lanes.append([(order_id, kind) for kind in kinds])
    messages = []
    clock = _START
    while any(lanes):
        lane = rng.choice([lane for lane in lanes if lane])
        order_id, kind = lane.pop(0)
        clock += timedelta(minutes=rng.randint(-5, 40))
        messages.append(_event(rng, order_id, kind, clock))
    return messages


async def _rows(container: Container) -> tuple[list[Any], list[Any]]:
    async with container.db.read() as conn:
        summaries = [
            tuple(r) for r in await conn.execute(select(order_summary).order_by(order_summary.c.order_id))
        ]
        sales = [tuple(r) for r in await conn.execute(select(sales_by_day).order_by(sales_by_day.c.day))]
    return summaries, sales


async def _clear(container: Container) -> None:
    async with container.db.write() as conn:
        await conn.execute(delete(order_summary))
        await conn.execute(delete(sales_by_day))


async def _apply(container: Container, batches: Sequence[Sequence[Message]]) -> None:
    for batch in batches:
        async with container.db.write() as conn:
            await ORDER_SUMMARY.apply_all(conn, batch, _TARGETS)
            await SALES_BY_DAY.apply_all(conn, batch, _TARGETS)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_batched_apply_equals_one_message_at_a_time(container: Container, seed: int) -> None:
    assert ORDER_SUMMARY.apply_batch is not None
    assert SALES_BY_DAY.apply_batch is not None
    rng = random.Random(seed)
    messages = _history(rng, orders=12)
    await _clear(container)
    await _apply(container, [[m] for m in messages])
    one_by_one = await _rows(container)
    assert one_by_one[0], "the history produced no summaries"

    await _clear(container)
    cuts = sorted(rng.sample(range(1, len(messages)), 4))
    batches = [messages[a:b] for a, b in zip([0, *cuts], [*cuts, len(messages)], strict=True)]
    await _apply(container, batches)
    assert await _rows(container) == one_by_one
