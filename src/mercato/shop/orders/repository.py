"""Orders persistence: `orders` and `orders_lines` (this context's tables alone)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, bindparam, insert, literal_column, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.storage.statements import driver_prepared
from mercato.kit.storage.statements_in_tx import on_connection
from mercato.shop.orders.model import Order, OrderLine, OrderStatus
from mercato.shop.orders.tables import order_lines, orders

_STATUS_MOVES: dict[tuple[tuple[OrderStatus, ...], OrderStatus], Any] = {}


def _status_move(sources: tuple[OrderStatus, ...], target: OrderStatus) -> Any:
    """The saga steps' status move (`set_status_from`), one prepared statement per (sources, target)
    on the raw-driver layer: a handful in all. RETURNING says whether it moved, on both drivers."""
    statement = _STATUS_MOVES.get((sources, target))
    if statement is None:
        # Equalities, not IN: an expanding IN is re-rendered on every execution.
        in_source = or_(*(orders.c.status == literal_column(f"'{source.value}'") for source in sources))
        statement = _STATUS_MOVES[(sources, target)] = driver_prepared(
            update(orders)
            .where(orders.c.id == bindparam("order_id", type_=orders.c.id.type), in_source)
            .values(
                status=literal_column(f"'{target.value}'"),
                version=orders.c.version + 1,
                updated_at=bindparam("now", type_=orders.c.updated_at.type),
            )
            .returning(orders.c.id)
        )
    return statement


_ORDER_COLUMNS = (
    "id",
    "customer_id",
    "status",
    "currency",
    "total_minor",
    "item_count",
    "version",
    "created_at",
    "updated_at",
)
_LINE_COLUMNS = ("line_no", "product_id", "sku", "name", "unit_price_minor", "quantity", "line_total_minor")
# The order's write (`add`) on the raw-driver layer: the header's parameters are `o_<column>`.
_ORDER_HEADER = driver_prepared(
    insert(orders).values(
        {name: bindparam(f"o_{name}", type_=orders.c[name].type) for name in _ORDER_COLUMNS}
    )
)
_ORDER_LINE = driver_prepared(
    insert(order_lines).values(
        order_id=bindparam("o_id", type_=order_lines.c.order_id.type),
        **{n: bindparam(n, type_=order_lines.c[n].type) for n in _LINE_COLUMNS},
    )
)
_ORDER_INSERTS: dict[int, Any] = {}
# Orders with more lines than this are written as the header and one executemany of their lines.
_MAX_PREPARED_LINES = 64


def _order_insert(count: int) -> Any:
    """The header and `count` lines (parameters `o_<column>`, `<column>_<i>`), registered once per
    line count: on PostgreSQL one statement (`WITH new_order AS (INSERT …) INSERT INTO order_lines`),
    on SQLite, which has no data-modifying CTEs, the same two inserts in turn."""
    statement = _ORDER_INSERTS.get(count)
    if statement is None:
        lines = insert(order_lines).values(
            [
                {
                    "order_id": bindparam("o_id", type_=order_lines.c.order_id.type),
                    **{n: bindparam(f"{n}_{i}", type_=order_lines.c[n].type) for n in _LINE_COLUMNS},
                }
                for i in range(count)
            ]
        )
        statement = _ORDER_INSERTS[count] = driver_prepared(
            lines.add_cte(_ORDER_HEADER.cte("new_order")), in_turn=(_ORDER_HEADER, lines)
        )
    return statement


def _line_params(line: OrderLine) -> dict[str, Any]:
    return {name: getattr(line, name) for name in _LINE_COLUMNS}


def _order(row: Any, lines: tuple[OrderLine, ...] = ()) -> Order:
    return Order(
        id=row.id,
        customer_id=row.customer_id,
        status=OrderStatus(row.status),
        currency=row.currency,
        total_minor=int(row.total_minor),
        item_count=int(row.item_count),
        version=int(row.version),
        created_at=row.created_at,
        updated_at=row.updated_at,
        lines=lines,
    )


def _line(r: Any) -> OrderLine:
    return OrderLine(
        line_no=r.line_no,
        product_id=r.product_id,
        sku=r.sku,
        name=r.name,
        unit_price_minor=int(r.unit_price_minor),
        quantity=int(r.quantity),
        line_total_minor=int(r.line_total_minor),
    )


class OrdersRepository:
    """Queries on the orders tables. Every method runs on the connection it is given."""

    async def add(self, conn: AsyncConnection, order: Order) -> None:
        """The order and its lines, in the caller's transaction, on the raw-driver layer: one
        statement on PostgreSQL (the header inserted by a data-modifying CTE), two on SQLite."""
        params: dict[str, Any] = {
            "o_id": order.id,
            "o_customer_id": order.customer_id,
            "o_status": order.status.value,
            "o_currency": order.currency,
            "o_total_minor": order.total_minor,
            "o_item_count": order.item_count,
            "o_version": order.version,
            "o_created_at": order.created_at,
            "o_updated_at": order.updated_at,
        }
        for i, line in enumerate(order.lines):
            params.update({f"{name}_{i}": value for name, value in _line_params(line).items()})
        if len(order.lines) > _MAX_PREPARED_LINES:
            # Rare (the cart's line limit is configurable): the header, then the lines in one
            # executemany, each a registered statement.
            executor = on_connection(conn)
            await executor.run(_ORDER_HEADER, params)
            await executor.run(
                _ORDER_LINE, [{"o_id": order.id, **_line_params(line)} for line in order.lines]
            )
            return
        await on_connection(conn).run(_order_insert(len(order.lines)), params)

    async def set_status(
        self,
        conn: AsyncConnection,
        order_id: uuid.UUID,
        *,
        expected: OrderStatus,
        target: OrderStatus,
        now: datetime,
    ) -> bool:
        """Move the order from `expected` to `target`; False if it is no longer in `expected`."""
        result = await conn.execute(
            update(orders)
            .where(orders.c.id == order_id, orders.c.status == expected.value)
            .values(status=target.value, version=orders.c.version + 1, updated_at=now)
        )
        return result.rowcount == 1

    async def set_status_from(
        self,
        conn: AsyncConnection,
        order_id: uuid.UUID,
        *,
        sources: Sequence[OrderStatus],
        target: OrderStatus,
        now: datetime,
    ) -> bool:
        """Move the order to `target` if it is in one of `sources`; False otherwise."""
        if not sources:
            return False
        statement = _status_move(tuple(sources), target)
        return bool(await on_connection(conn).rows(statement, {"order_id": order_id, "now": now}))

    async def get(self, conn: AsyncConnection, order_id: uuid.UUID) -> Order | None:
        row = (await conn.execute(select(orders).where(orders.c.id == order_id))).first()
        if row is None:
            return None
        line_rows = await conn.execute(
            select(order_lines).where(order_lines.c.order_id == order_id).order_by(order_lines.c.line_no)
        )
        return _order(row, tuple(_line(r) for r in line_rows))

    async def with_lines(self, conn: AsyncConnection, *where: Any, limit: int) -> list[Order]:
        """Up to `limit` orders matching `where`, in id order, each with its lines (two statements)."""
        rows = list(await conn.execute(select(orders).where(*where).order_by(orders.c.id).limit(limit)))
        if not rows:
            return []
        lines: dict[uuid.UUID, list[OrderLine]] = {}
        ol = order_lines.c
        found = await conn.execute(
            select(order_lines).where(ol.order_id.in_([r.id for r in rows])).order_by(ol.order_id, ol.line_no)
        )
        for r in found:
            lines.setdefault(r.order_id, []).append(_line(r))
        return [_order(r, tuple(lines.get(r.id, ()))) for r in rows]

    async def settled(
        self, conn: AsyncConnection, *, settled_before: datetime, after_id: uuid.UUID | None, limit: int
    ) -> list[Order]:
        """Orders unchanged since before `settled_before`, in id order after `after_id`."""
        where = [orders.c.updated_at < settled_before]
        if after_id is not None:
            where.append(orders.c.id > after_id)
        return await self.with_lines(conn, *where, limit=limit)

    async def completed_between(
        self, conn: AsyncConnection, *, start: datetime, end: datetime, after_id: uuid.UUID | None, limit: int
    ) -> list[Order]:
        """Completed orders whose completion (their last change) falls in [start, end)."""
        c = orders.c
        where = [c.status == OrderStatus.COMPLETED.value, c.updated_at >= start, c.updated_at < end]
        if after_id is not None:
            where.append(c.id > after_id)
        return await self.with_lines(conn, *where, limit=limit)

    async def existing_ids(self, conn: AsyncConnection, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        if not ids:
            return set()
        return set((await conn.execute(select(orders.c.id).where(orders.c.id.in_(ids)))).scalars())

    async def id_bounds(self, conn: AsyncConnection) -> tuple[uuid.UUID, uuid.UUID] | None:
        # Two index ends rather than min()/max(): PostgreSQL has no min(uuid).
        first = select(orders.c.id).order_by(orders.c.id).limit(1)
        low = (await conn.execute(first)).scalar()
        high = (await conn.execute(select(orders.c.id).order_by(orders.c.id.desc()).limit(1))).scalar()
        return None if low is None or high is None else (low, high)

    def page_statement(
        self, *, customer_id: uuid.UUID | None, after_id: uuid.UUID | None, limit: int
    ) -> Select[Any]:
        """Newest first, `limit` rows after the keyset `after_id`.

        Ids are UUIDv7, so `id DESC` is creation order: a customer's page is one backward range
        scan of ix_orders_customer_id_id, and the all-orders page one of the primary key. The
        query-plan test runs this very statement under EXPLAIN.
        """
        stmt = select(orders)
        if customer_id is not None:
            stmt = stmt.where(orders.c.customer_id == customer_id)
        if after_id is not None:
            stmt = stmt.where(orders.c.id < after_id)
        return stmt.order_by(orders.c.id.desc()).limit(limit)

    async def page(
        self, conn: AsyncConnection, *, customer_id: uuid.UUID | None, after_id: uuid.UUID | None, limit: int
    ) -> list[Order]:
        stmt = self.page_statement(customer_id=customer_id, after_id=after_id, limit=limit)
        return [_order(r) for r in await conn.execute(stmt)]
