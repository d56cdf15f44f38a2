"""Cart persistence: `cart_items` (this context's table alone)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.shop.cart.model import CartItem
from mercato.shop.cart.tables import cart_items


class DuplicateItem(Exception):
    """A concurrent request inserted the same (customer, sku) line first."""


class CartRepository:
    """Queries on `cart_items`. Every method runs on the connection it is given."""

    async def items(self, conn: AsyncConnection, customer_id: uuid.UUID) -> list[CartItem]:
        rows = await conn.execute(
            select(cart_items)
            .where(cart_items.c.customer_id == customer_id)
            .order_by(cart_items.c.added_at, cart_items.c.sku)
        )
        return [CartItem(r.sku, int(r.quantity), r.added_at, r.updated_at) for r in rows]

    async def set_quantity(
        self, conn: AsyncConnection, customer_id: uuid.UUID, sku: str, quantity: int, now: datetime
    ) -> bool:
        result = await conn.execute(
            update(cart_items)
            .where(cart_items.c.customer_id == customer_id, cart_items.c.sku == sku)
            .values(quantity=quantity, updated_at=now)
        )
        return result.rowcount == 1

    async def insert(
        self, conn: AsyncConnection, customer_id: uuid.UUID, sku: str, quantity: int, now: datetime
    ) -> None:
        try:
            await conn.execute(
                insert(cart_items).values(
                    customer_id=customer_id, sku=sku, quantity=quantity, added_at=now, updated_at=now
                )
            )
        except IntegrityError as exc:
            raise DuplicateItem(sku) from exc

    async def remove(self, conn: AsyncConnection, customer_id: uuid.UUID, sku: str) -> None:
        await conn.execute(
            delete(cart_items).where(cart_items.c.customer_id == customer_id, cart_items.c.sku == sku)
        )

    async def remove_exact(
        self, conn: AsyncConnection, customer_id: uuid.UUID, sku: str, quantity: int
    ) -> bool:
        """Delete the line only if it still has `quantity`: a line edited meanwhile stays."""
        result = await conn.execute(
            delete(cart_items).where(
                cart_items.c.customer_id == customer_id,
                cart_items.c.sku == sku,
                cart_items.c.quantity == quantity,
            )
        )
        return result.rowcount == 1

    async def clear(self, conn: AsyncConnection, customer_id: uuid.UUID) -> None:
        await conn.execute(delete(cart_items).where(cart_items.c.customer_id == customer_id))

    async def existing_skus(
        self, conn: AsyncConnection, customer_id: uuid.UUID, skus: Sequence[str]
    ) -> set[str]:
        if not skus:
            return set()
        rows = await conn.execute(
            select(cart_items.c.sku).where(
                cart_items.c.customer_id == customer_id, cart_items.c.sku.in_(list(skus))
            )
        )
        return {r.sku for r in rows}
