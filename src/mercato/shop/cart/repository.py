"""Cart persistence: `cart_items` (this context's table alone)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CompoundSelect, Select, and_, bindparam, delete, null, or_, select, tuple_, union_all
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert

from mercato.kit.storage.statements import Executor, driver_prepared
from mercato.kit.storage.statements_in_tx import on_connection
from mercato.shop.cart.model import CartItem
from mercato.shop.cart.tables import cart_items

_c = cart_items.c

# Built once (see CatalogService.quoting): the cart's hot statements are then bind and execute only.
_LINES = select(_c.sku, _c.quantity, _c.added_at, _c.updated_at).where(
    _c.customer_id == bindparam("customer_id")
)
# The lines plus one row for `probe_sku` with a NULL quantity, so a single join with the catalog
# prices both the cart and the SKU about to be put in it (which may not be a line yet).
_LINES_AND_PROBE = union_all(
    _LINES, select(bindparam("probe_sku", type_=_c.sku.type), null(), null(), null())
)
_TAKE_EXACTLY = (
    delete(cart_items)
    .where(
        _c.customer_id == bindparam("customer_id"),
        tuple_(_c.sku, _c.quantity).in_(bindparam("lines", expanding=True)),
    )
    .returning(_c.sku)
)

# Checkout's take of the whole cart: every line deleted, returned as `_LINES` reads them (a
# data-modifying CTE that `lines_statement(taken=True)` selects from, on PostgreSQL), and the same
# delete alone for SQLite, which reads the lines first in its write transaction (`CartService`).
_TAKEN_LINES = (
    delete(cart_items)
    .where(_c.customer_id == bindparam("customer_id", type_=_c.customer_id.type))
    .returning(_c.sku, _c.quantity, _c.added_at, _c.updated_at)
    .cte("taken_lines")
)
_TAKE_ALL = driver_prepared(
    delete(cart_items)
    .where(_c.customer_id == bindparam("customer_id", type_=_c.customer_id.type))
    .returning(_c.sku)
)

# Checkout's take, one registered statement per line count (an expanding IN is rendered again on
# every execution, which the driver path does not do): `(sku, quantity)` pairs as equalities.
_TAKES: dict[int, Any] = {}
_MAX_PREPARED_TAKE = 64


def _take_exactly(count: int) -> Any:
    statement = _TAKES.get(count)
    if statement is None:
        pairs = [
            and_(
                _c.sku == bindparam(f"sku_{i}", type_=_c.sku.type),
                _c.quantity == bindparam(f"quantity_{i}", type_=_c.quantity.type),
            )
            for i in range(count)
        ]
        statement = _TAKES[count] = driver_prepared(
            delete(cart_items)
            .where(_c.customer_id == bindparam("customer_id", type_=_c.customer_id.type), or_(*pairs))
            .returning(_c.sku)
        )
    return statement


def _upsert(dialect: str) -> Insert:
    """Insert the line, or on (customer_id, sku) set its quantity, returning when it was first added."""
    module: Any = postgresql if dialect == "postgresql" else sqlite
    stmt = module.insert(cart_items)
    return stmt.on_conflict_do_update(  # type: ignore[no-any-return]
        index_elements=[_c.customer_id, _c.sku],
        set_={"quantity": stmt.excluded.quantity, "updated_at": stmt.excluded.updated_at},
    ).returning(_c.added_at)


# Registered for the raw driver (kit/storage/statements.py): putting a line runs there.
_UPSERTS = {dialect: driver_prepared(_upsert(dialect)) for dialect in ("postgresql", "sqlite")}


def item_from_row(row: Any) -> CartItem | None:
    """The cart line in a row of `lines_statement`, None for `probe_sku`'s row."""
    if row.quantity is None:
        return None
    return CartItem(row.sku, int(row.quantity), row.added_at, row.updated_at)


class CartRepository:
    """Queries on `cart_items`. Every method runs on the connection it is given."""

    @staticmethod
    def lines_statement(*, with_probe: bool) -> Select[Any] | CompoundSelect[Any]:
        """The customer's lines (`customer_id`), and with `with_probe` a row for `probe_sku`."""
        return _LINES_AND_PROBE if with_probe else _LINES

    @staticmethod
    def taken_lines_statement() -> Select[Any]:
        """The customer's lines (`customer_id`) as `lines_statement` reads them, deleted by the same
        statement (PostgreSQL's data-modifying CTE)."""
        t = _TAKEN_LINES.c
        return select(t.sku, t.quantity, t.added_at, t.updated_at).add_cte(_TAKEN_LINES)

    @staticmethod
    def take_all_statement() -> Any:
        """Delete the customer's lines (`customer_id`), RETURNING their SKUs (registered)."""
        return _TAKE_ALL

    async def upsert(
        self, conn: AsyncConnection, customer_id: uuid.UUID, sku: str, quantity: int, now: datetime
    ) -> datetime:
        """Set the line's quantity, adding it if absent; when the line was first added.

        One statement where update-then-insert took two, and a concurrent first insert of the
        same line cannot fail it: the loser updates the winner's row.
        """
        line = {"customer_id": customer_id, "sku": sku, "quantity": quantity}
        line |= {"added_at": now, "updated_at": now}
        added_at: datetime = (await conn.execute(_UPSERTS[conn.dialect.name], line)).scalar_one()
        return added_at

    @staticmethod
    async def upsert_on(
        executor: Executor, dialect: Dialect, customer_id: uuid.UUID, sku: str, quantity: int, now: datetime
    ) -> datetime:
        """`upsert` on a driver-path transaction (`driver_transaction`)."""
        line = {"customer_id": customer_id, "sku": sku, "quantity": quantity}
        line |= {"added_at": now, "updated_at": now}
        ((added_at,),) = await executor.rows(_UPSERTS[dialect.name], line)
        return cast(datetime, added_at)  # RETURNING's columns converted by the driver path

    async def take_exactly(
        self, conn: AsyncConnection, customer_id: uuid.UUID, lines: Sequence[tuple[str, int]]
    ) -> set[str]:
        """Delete the lines that still have these exact quantities, in one statement; their SKUs.
        On the raw-driver layer in the caller's transaction (checkout's), prepared once per line
        count up to `_MAX_PREPARED_TAKE`."""
        if not lines:
            return set()
        if len(lines) > _MAX_PREPARED_TAKE:
            rows = await conn.execute(_TAKE_EXACTLY, {"customer_id": customer_id, "lines": list(lines)})
            return {row.sku for row in rows}
        params: dict[str, Any] = {"customer_id": customer_id}
        for i, (sku, quantity) in enumerate(lines):
            params[f"sku_{i}"], params[f"quantity_{i}"] = sku, quantity
        return {row[0] for row in await on_connection(conn).rows(_take_exactly(len(lines)), params)}

    async def remove(self, conn: AsyncConnection, customer_id: uuid.UUID, sku: str) -> None:
        await conn.execute(
            delete(cart_items).where(cart_items.c.customer_id == customer_id, cart_items.c.sku == sku)
        )

    async def clear(self, conn: AsyncConnection, customer_id: uuid.UUID) -> None:
        await conn.execute(delete(cart_items).where(cart_items.c.customer_id == customer_id))
