"""Statement budgets of the reporting projectors the worker runs: a busy pass costs a fixed few
statements, however many events, orders and stream partitions it covers (both databases).

Counted the way the checkout bench's probe counts (`statement_budget.counting`). Session 11: a pass
was the probe, the checkpoint's lock, one read per partition with work (up to 16 for
`order_summary`, which reads two topics of 8 partitions), the projection's writes (order_summary: a
read, an insert and an executemany update, one execution per changed order; sales_by_day: an update
and maybe an insert per day and currency) and the checkpoint's save.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from mercato.bootstrap import Container
from mercato.kit.ids import new_id
from mercato.kit.messaging import Message
from mercato.kit.messaging.message import partition_for
from mercato.shop.reporting.model import ORDER_COMPLETED, ORDER_PLACED
from mercato.shop.reporting.tables import order_summary, sales_by_day
from mercato.workers.projections import build_projectors
from tests.integration.statement_budget import counting

_AT = datetime(2026, 12, 6, 12, tzinfo=UTC)
PARTITIONS = 8  # the SQL log's default


def _event(order_id: uuid.UUID, kind: str, topic: str, n: int) -> Message:
    data: dict[str, Any] = {
        "order_id": str(order_id),
        "customer_id": str(uuid.UUID(int=order_id.int ^ 1)),
        "currency": "EUR",
        "total_minor": 1000 + n,
        "items": [{"sku": "SKU-1", "product_id": str(order_id), "quantity": 1, "unit_price_minor": 1000}],
    }
    if kind == ORDER_COMPLETED:
        data["completed_at"] = (_AT + timedelta(days=n % 3)).isoformat()
    return Message(
        id=new_id(),
        source="test",
        type=kind,
        subject=str(order_id),
        time=_AT,
        data=data,
        topic=topic,
        key=str(order_id),
    )


def _orders_on_every_partition() -> list[uuid.UUID]:
    orders: dict[int, uuid.UUID] = {}
    while len(orders) < PARTITIONS:
        order_id = new_id()
        orders.setdefault(partition_for(str(order_id), partitions=PARTITIONS), order_id)
    return list(orders.values())


def _history(orders: list[uuid.UUID]) -> list[Message]:
    """Each order placed, its payment authorized and captured, then completed."""
    out: list[Message] = []
    for n, order_id in enumerate(orders):
        out += [
            _event(order_id, ORDER_PLACED, "mercato.orders", n),
            _event(order_id, "mercato.payments.payment_authorized", "mercato.payments", n),
            _event(order_id, "mercato.payments.payment_captured", "mercato.payments", n),
            _event(order_id, ORDER_COMPLETED, "mercato.orders", n),
        ]
    return out


async def test_a_busy_projector_pass_is_a_fixed_few_statements(container: Container) -> None:
    projectors = build_projectors(container)
    # Every partition of both topics has a checkpoint row: the steady state, not the first pass.
    await container.stream.publish(_history(_orders_on_every_partition()))
    for projector in projectors.values():
        assert await projector.run_once() > 0

    orders = _orders_on_every_partition() + _orders_on_every_partition()
    await container.stream.publish(_history(orders))
    passes = {}
    for name, projector in projectors.items():
        with counting(container) as tally:
            assert await projector.run_once() > 0
        passes[name] = tally

    # The probe (autocommitted), then in one transaction: the checkpoint's compare-and-set over
    # every partition with work, one read of all their log ranges, and the read model's own:
    # order_summary reads the batch's summaries and upserts the new and changed ones in one
    # statement; sales_by_day adds every (day, currency) of the batch in one.
    summary, sales = passes["order_summary"], passes["sales_by_day"]
    assert (len(summary.statements), summary.transactions) == (5, 1), summary.report()
    assert (len(sales.statements), sales.transactions) == (4, 1), sales.report()

    async with container.db.read() as conn:
        summaries = await conn.scalar(select(func.count()).select_from(order_summary))
        days = (await conn.execute(select(sales_by_day.c.day, sales_by_day.c.orders))).all()
    assert summaries == 3 * PARTITIONS
    completions = [n % 3 for n in range(PARTITIONS)] + [n % 3 for n in range(2 * PARTITIONS)]
    assert sorted(days) == [((_AT + timedelta(days=d)).date(), completions.count(d)) for d in range(3)]
