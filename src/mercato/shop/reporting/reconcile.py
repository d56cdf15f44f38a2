"""Read-model reconciliation: compare each read model with the write model and count the drift.

A projection is correct only if every event reached it and its code folded each one right. Neither
can be proved from the read side alone, and a bug (or a hand-edited row, a restore of one table, a
trimmed log) makes a read model drift without any error. So a periodic check recomputes what the
read model *should* say from the write model (the orders context, through its service: this
context never reads another's tables) and compares:

- `order_summary`: per order, customer, status, currency, total, item count and items (sku,
  product, quantity, unit price). The payment state comes from another writer (the payment ledger)
  and is not compared here.
- `sales_by_day`: per (UTC day, currency), the completed orders and their revenue; an order's day
  is its completion time (`orders.updated_at`, the `completed_at` its v2 event carries).

Only what has *settled* is compared: orders unchanged for `settle_s` (the projectors had time to
apply their events), days that ended `settle_s` ago. A projector stalled for longer than that shows
up as drift too; the lag metric tells the two apart.

`sample` (the worker's periodic job) checks a random window of orders and a few days: cheap, and
over many passes it covers the history. `full` (`mercato projections verify NAME`) checks every
settled row, both ways (rows missing from the read model, and read-model rows with no order).
The repair is a rebuild (`--repair`): the log replayed from zero into fresh tables.

What runs where (ADR 0053): the comparisons are pure functions (`diff_summaries`, `diff_sales`),
but they are not shipped to another process on their own: pickling the rows costs more than the
fold. The worker runs the whole check, reads included, in its process pool
(`workers/reconcile.py`); the operator's CLI runs it inline.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from types import SimpleNamespace
from typing import Any, Literal, Protocol

from sqlalchemy import select

from mercato.kit.clock import Clock
from mercato.kit.storage import Database
from mercato.shop.reporting.projections import summary_from_row
from mercato.shop.reporting.tables import order_summary, sales_by_day

__all__ = ["RECONCILED", "Drift", "OrderFacts", "Reconciler", "diff_sales", "diff_summaries"]

RECONCILED = ("order_summary", "sales_by_day")
Mode = Literal["sample", "full"]
_PAGE = 500
# The earliest day a full check of sales_by_day starts from.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class OrderedItem(Protocol):
    """One line of an order as reconciliation reads it (the orders contract's `OrderedItem`)."""

    @property
    def sku(self) -> str: ...
    @property
    def product_id(self) -> uuid.UUID: ...
    @property
    def quantity(self) -> int: ...
    @property
    def unit_price_minor(self) -> int: ...


class OrderSnapshot(Protocol):
    """An order as reconciliation reads it (the orders contract's `OrderSnapshot`), described here
    structurally so the write model's shape is all this context depends on."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def customer_id(self) -> uuid.UUID: ...
    @property
    def status(self) -> str: ...
    @property
    def currency(self) -> str: ...
    @property
    def total_minor(self) -> int: ...
    @property
    def items(self) -> Sequence[OrderedItem]: ...
    @property
    def updated_at(self) -> datetime | None: ...


class OrderFacts(Protocol):
    """The orders context's write model, as reconciliation reads it (implemented by OrdersService)."""

    async def settled_snapshots(
        self, *, settled_before: datetime, after_id: uuid.UUID | None = None, limit: int = 500
    ) -> Sequence[OrderSnapshot]: ...

    async def sample_settled(
        self, *, settled_before: datetime, size: int, rng: random.Random
    ) -> Sequence[OrderSnapshot]: ...

    async def completed_between(
        self, *, start: datetime, end: datetime, page: int = 1000
    ) -> Sequence[OrderSnapshot]: ...

    async def existing(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]: ...


@dataclass(frozen=True, slots=True)
class Drift:
    """What one check found. `rows` is the drift: read-model rows missing, wrong or extra."""

    projection: str
    mode: Mode
    checked: int
    missing: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.missing) + len(self.wrong) + len(self.extra)


def _summary_status(status: str) -> str:
    # The read model knows pending, completed and cancelled; any other write-model state is "not
    # finished" as far as its events have said.
    return status if status in ("completed", "cancelled") else "pending"


def expected_summary(order: OrderSnapshot) -> dict[str, Any]:
    return {
        "customer_id": str(order.customer_id),
        "status": _summary_status(order.status),
        "currency": order.currency,
        "total_minor": order.total_minor,
        "item_count": sum(i.quantity for i in order.items),
        "items": sorted((i.sku, str(i.product_id), i.quantity, i.unit_price_minor) for i in order.items),
    }


def _actual_summary(row: Any) -> dict[str, Any]:
    s = summary_from_row(row)
    return {
        "customer_id": s.customer_id,
        "status": s.status,
        "currency": s.currency,
        "total_minor": s.total_minor,
        "item_count": s.item_count,
        "items": sorted(
            (str(i["sku"]), str(i["product_id"]), int(i["quantity"]), int(i["unit_price_minor"]))
            for i in s.items
        ),
    }


class Reconciler:
    def __init__(
        self,
        db: Database,
        orders: OrderFacts,
        clock: Clock,
        *,
        settle_s: float = 300.0,
        sample_size: int = 200,
        rng: random.Random | None = None,
    ) -> None:
        self._db = db
        self._orders = orders
        self._clock = clock
        self.settle_s = settle_s
        self.sample_size = sample_size
        self._rng = rng or random.Random()

    async def verify(self, projection: str, *, mode: Mode) -> Drift:
        if projection == "order_summary":
            return await self._order_summary(mode)
        if projection == "sales_by_day":
            return await self._sales_by_day(mode)
        raise ValueError(f"no reconciliation for {projection!r}; known: {', '.join(RECONCILED)}")

    def _settled_before(self) -> datetime:
        return self._clock.now() - timedelta(seconds=self.settle_s)

    # ---- order_summary -------------------------------------------------------------------------

    async def _order_summary(self, mode: Mode) -> Drift:
        cutoff = self._settled_before()
        drift = Drift("order_summary", mode, 0)
        checked = 0
        if mode == "sample":
            orders = await self._orders.sample_settled(
                settled_before=cutoff, size=self.sample_size, rng=self._rng
            )
            checked = await self._compare_orders(orders, drift)
        else:
            after: uuid.UUID | None = None
            while page := await self._orders.settled_snapshots(
                settled_before=cutoff, after_id=after, limit=_PAGE
            ):
                checked += await self._compare_orders(page, drift)
                after = page[-1].id
            checked += await self._find_extra_summaries(drift)
        return Drift(drift.projection, mode, checked, drift.missing, drift.wrong, drift.extra)

    async def _compare_orders(self, orders: Sequence[OrderSnapshot], drift: Drift) -> int:
        if not orders:
            return 0
        t = order_summary.c
        async with self._db.read() as conn:
            result = await conn.execute(select(order_summary).where(t.order_id.in_([o.id for o in orders])))
            rows = [dict(row._mapping) for row in result]
        missing, wrong = diff_summaries(orders, rows)
        drift.missing.extend(missing)
        drift.wrong.extend(wrong)
        return len(orders)

    async def _find_extra_summaries(self, drift: Drift) -> int:
        """Read-model orders (rows an order event made) with no order behind them."""
        t = order_summary.c
        after: uuid.UUID | None = None
        checked = 0
        while True:
            stmt = select(t.order_id).where(t.customer_id.is_not(None))
            if after is not None:
                stmt = stmt.where(t.order_id > after)
            async with self._db.read() as conn:
                ids = list((await conn.execute(stmt.order_by(t.order_id).limit(_PAGE))).scalars())
            if not ids:
                return checked
            known = await self._orders.existing(ids)
            drift.extra.extend(str(i) for i in ids if i not in known)
            checked += len(ids) - len(known)
            after = ids[-1]

    # ---- sales_by_day --------------------------------------------------------------------------

    async def _sales_by_day(self, mode: Mode) -> Drift:
        # Whole UTC days that ended before the settle cutoff.
        last_day = self._settled_before().astimezone(UTC).date() - timedelta(days=1)
        s = sales_by_day.c
        async with self._db.read() as conn:
            stored = {
                (r.day, r.currency): (int(r.orders), int(r.revenue_minor))
                for r in await conn.execute(select(sales_by_day).where(s.day <= last_day))
            }
        if mode == "sample":
            days = {last_day, last_day - timedelta(days=1)}
            older = sorted(day for day, _ in stored if day not in days)
            if older:
                days.add(self._rng.choice(older))
            orders: list[OrderSnapshot] = []
            for day in sorted(days):
                orders += await self._orders.completed_between(
                    start=_day_start(day), end=_day_start(day + timedelta(days=1))
                )
            stored = {key: value for key, value in stored.items() if key[0] in days}
        else:
            orders = list(
                await self._orders.completed_between(
                    start=_EPOCH, end=_day_start(last_day + timedelta(days=1))
                )
            )
        checked, missing, wrong, extra = diff_sales(stored, orders)
        return Drift("sales_by_day", mode, checked, missing, wrong, extra)


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def _totals(orders: Sequence[OrderSnapshot]) -> dict[tuple[date, str], tuple[int, int]]:
    totals: dict[tuple[date, str], tuple[int, int]] = {}
    for order in orders:
        assert order.updated_at is not None  # a snapshot read from the write model carries it
        key = (order.updated_at.astimezone(UTC).date(), order.currency)
        count, revenue = totals.get(key, (0, 0))
        totals[key] = (count + 1, revenue + order.total_minor)
    return totals


def diff_summaries(
    orders: Sequence[OrderSnapshot], rows: Sequence[dict[str, Any]]
) -> tuple[list[str], list[str]]:
    """The orders whose `order_summary` row (as column mappings) is missing, and those it gets wrong."""
    found = {row["order_id"]: _actual_summary(SimpleNamespace(**row)) for row in rows}
    missing: list[str] = []
    wrong: list[str] = []
    for order in orders:
        actual = found.get(order.id)
        if actual is None:
            missing.append(str(order.id))
        elif actual != expected_summary(order):
            wrong.append(str(order.id))
    return missing, wrong


def diff_sales(
    stored: dict[tuple[date, str], tuple[int, int]], orders: Sequence[OrderSnapshot]
) -> tuple[int, list[str], list[str], list[str]]:
    """`sales_by_day` as stored against the totals of the completed orders: (keys checked, missing,
    wrong, extra), each key labelled `day/currency`."""
    expected = _totals(orders)
    missing: list[str] = []
    wrong: list[str] = []
    extra: list[str] = []
    keys = sorted(set(stored) | set(expected))
    for key in keys:
        label = f"{key[0].isoformat()}/{key[1]}"
        if key not in stored:
            missing.append(label)
        elif key not in expected:
            extra.append(label)
        elif stored[key] != expected[key]:
            wrong.append(label)
    return len(keys), missing, wrong, extra
