"""Reporting queries: pages of order summaries and the sales-by-day view.

These read models are eventually consistent: a row appears or changes after the outbox relay has
published the event and the projector has applied it (both are woken by the commit's work signal,
kit/storage/signals.py: typically milliseconds). A client that just placed an order reads it
through `GET /v1/orders/{id}` (the write model) until it shows up here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date

from sqlalchemy import select

from mercato.kit.storage import Database
from mercato.shop.reporting.model import Summary
from mercato.shop.reporting.projections import summary_from_row
from mercato.shop.reporting.tables import order_summary, sales_by_day


@dataclass(frozen=True, slots=True)
class DaySales:
    day: date
    currency: str
    orders: int
    revenue_minor: int


class ReportingService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def summaries(
        self, *, customer_id: uuid.UUID | None, limit: int, after_id: uuid.UUID | None = None
    ) -> tuple[list[Summary], bool]:
        """Newest first, keyset by order id (UUIDv7); and whether more follow."""
        t = order_summary.c
        # A row made only by a payment event has no customer yet: not an order to show.
        stmt = select(order_summary).where(t.customer_id.is_not(None))
        if customer_id is not None:
            stmt = stmt.where(t.customer_id == customer_id)
        if after_id is not None:
            stmt = stmt.where(t.order_id < after_id)
        stmt = stmt.order_by(t.order_id.desc()).limit(limit + 1)
        async with self._db.read() as conn:
            rows = [summary_from_row(r) for r in await conn.execute(stmt)]
        return rows[:limit], len(rows) > limit

    async def sales_by_day(self, *, start: date, end: date) -> list[DaySales]:
        """Completed orders and revenue per UTC day and currency, `start` to `end` inclusive."""
        t = sales_by_day.c
        stmt = select(sales_by_day).where(t.day >= start, t.day <= end).order_by(t.day, t.currency)
        async with self._db.read() as conn:
            return [
                DaySales(r.day, r.currency, int(r.orders), int(r.revenue_minor))
                for r in await conn.execute(stmt)
            ]
