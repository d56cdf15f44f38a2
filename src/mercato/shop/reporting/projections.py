"""The reporting projections: how each read model applies the events it reads.

Every message reaches these functions through `read_message` (the projection's `reader`): they are
written against the current schema version of each event, and a stored v1 `order_completed` arrives
as v2 (its `completed_at` null, which `_completed_day` reads as "the event's own time").

Every write goes through the `tables` mapping the projector passes (the live table or its rebuild
copy). The projector serializes a projection's passes on its checkpoint lock, so a read-then-write
here never races another writer of the same rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Table, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.messaging import Message
from mercato.kit.projections import Projection
from mercato.kit.projections.bulk import rows_by_key, upsert_rows
from mercato.schemas import read_message
from mercato.shop.reporting.model import ORDER_COMPLETED, PaymentState, Summary, fold, relevant
from mercato.shop.reporting.tables import order_summary, sales_by_day

__all__ = ["ORDER_SUMMARY", "PROJECTIONS", "SALES_BY_DAY", "summary_from_row"]

ORDERS_TOPIC = "mercato.orders"
PAYMENTS_TOPIC = "mercato.payments"


def summary_from_row(row: Any) -> Summary:
    return Summary(
        order_id=str(row.order_id),
        customer_id=str(row.customer_id) if row.customer_id is not None else None,
        status=row.status,
        currency=row.currency,
        total_minor=int(row.total_minor) if row.total_minor is not None else None,
        item_count=int(row.item_count),
        items=tuple(row.items),
        payment_state=PaymentState(row.payment_state),
        placed_at=row.placed_at,
        updated_at=row.updated_at,
    )


def _values(summary: Summary) -> dict[str, Any]:
    return {
        "customer_id": uuid.UUID(summary.customer_id) if summary.customer_id else None,
        "status": summary.status,
        "currency": summary.currency,
        "total_minor": summary.total_minor,
        "item_count": summary.item_count,
        "items": list(summary.items),
        "payment_state": summary.payment_state.value,
        "placed_at": summary.placed_at,
        "updated_at": summary.updated_at,
    }


async def apply_order_summary(conn: AsyncConnection, message: Message, tables: Mapping[str, Table]) -> None:
    if not relevant(message.type):
        return
    table = tables[order_summary.name]
    order_id = uuid.UUID(str(message.data["order_id"]))
    row = (await conn.execute(select(table).where(table.c.order_id == order_id))).first()
    current = summary_from_row(row) if row is not None else None
    after = fold(current, message.type, message.data, message.time)
    if row is None:
        await conn.execute(insert(table).values(order_id=order_id, **_values(after)))
    elif after != current:
        await conn.execute(update(table).where(table.c.order_id == order_id).values(**_values(after)))


def _completed_day(message: Message) -> date:
    """The UTC day the order completed: v2's `completed_at` (the order's own completion time, the
    one the write model keeps), else the event's time; both are in the event, so a replay files it
    the same."""
    completed_at = message.data["completed_at"]
    moment = message.time if completed_at is None else datetime.fromisoformat(str(completed_at))
    return moment.astimezone(UTC).date()


async def apply_sales_by_day(conn: AsyncConnection, message: Message, tables: Mapping[str, Table]) -> None:
    if message.type != ORDER_COMPLETED:
        return
    table = tables[sales_by_day.name]
    day = _completed_day(message)
    currency = str(message.data["currency"])
    total = int(message.data["total_minor"])
    key = (table.c.day == day, table.c.currency == currency)
    result = await conn.execute(
        update(table)
        .where(*key)
        .values(orders=table.c.orders + 1, revenue_minor=table.c.revenue_minor + total)
    )
    if result.rowcount == 0:
        await conn.execute(insert(table).values(day=day, currency=currency, orders=1, revenue_minor=total))


async def apply_order_summaries(
    conn: AsyncConnection, messages: Sequence[Message], tables: Mapping[str, Table]
) -> None:
    """`apply_order_summary` over a batch: one read of the orders it touches and one upsert of the
    new and changed ones (each order's events folded in order)."""
    wanted = [m for m in messages if relevant(m.type)]
    if not wanted:
        return
    table = tables[order_summary.name]
    ids = list(dict.fromkeys(uuid.UUID(str(m.data["order_id"])) for m in wanted))
    before = {row.order_id: summary_from_row(row) for row in await rows_by_key(conn, table, "order_id", ids)}
    after: dict[uuid.UUID, Summary] = dict(before)
    for message in wanted:
        order_id = uuid.UUID(str(message.data["order_id"]))
        after[order_id] = fold(after.get(order_id), message.type, message.data, message.time)
    # The new and the changed summaries in one upsert (was an insert and an executemany update,
    # one execution per changed order).
    await upsert_rows(
        conn,
        table,
        [{"order_id": oid, **_values(s)} for oid, s in after.items() if before.get(oid) != s],
        key=["order_id"],
    )


async def apply_sales_by_days(
    conn: AsyncConnection, messages: Sequence[Message], tables: Mapping[str, Table]
) -> None:
    """`apply_sales_by_day` over a batch: the completions summed per (day, currency), then added
    in one statement."""
    totals: dict[tuple[date, str], list[int]] = {}
    for message in messages:
        if message.type != ORDER_COMPLETED:
            continue
        key = (_completed_day(message), str(message.data["currency"]))
        total = totals.setdefault(key, [0, 0])
        total[0] += 1
        total[1] += int(message.data["total_minor"])
    # Every (day, currency) of the batch in one upsert that adds to the stored totals (was an
    # update, and an insert when the day was new, per key).
    await upsert_rows(
        conn,
        tables[sales_by_day.name],
        [
            {"day": day, "currency": currency, "orders": orders, "revenue_minor": revenue}
            for (day, currency), (orders, revenue) in sorted(totals.items())
        ],
        key=["day", "currency"],
        add=["orders", "revenue_minor"],
    )


ORDER_SUMMARY = Projection(
    name="order_summary",
    topics=(ORDERS_TOPIC, PAYMENTS_TOPIC),
    tables=(order_summary,),
    apply=apply_order_summary,
    apply_batch=apply_order_summaries,
    reader=read_message,
)
SALES_BY_DAY = Projection(
    name="sales_by_day",
    topics=(ORDERS_TOPIC,),
    tables=(sales_by_day,),
    apply=apply_sales_by_day,
    apply_batch=apply_sales_by_days,
    reader=read_message,
)
PROJECTIONS: tuple[Projection, ...] = (ORDER_SUMMARY, SALES_BY_DAY)
