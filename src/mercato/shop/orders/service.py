"""Order use cases: turning the caller's cart into a pending order, and reading orders.

The cart lives in another context with its own transactions, so "create the order and empty the
cart" cannot be one commit. The cart's lines are taken first (atomically, only if unchanged),
then the order is written; if writing fails the lines are put back. Taking first means a double
submit produces one order and one `cart-changed` conflict, never two orders; the price is that
a crash between the two steps loses the cart's contents rather than duplicating an order.
"""

from __future__ import annotations

import uuid

from mercato.kit.clock import Clock
from mercato.kit.ids import new_id
from mercato.kit.storage import Database
from mercato.shop.cart.contracts import CartSource
from mercato.shop.orders.model import (
    EmptyCart,
    LineDraft,
    Order,
    OrderNotFound,
    UnavailableItems,
    place_order,
)
from mercato.shop.orders.repository import OrdersRepository


class OrdersService:
    def __init__(
        self, db: Database, clock: Clock, cart: CartSource, repository: OrdersRepository | None = None
    ) -> None:
        self._db = db
        self._clock = clock
        self._cart = cart
        self._repo = repository or OrdersRepository()

    async def place_from_cart(self, customer_id: uuid.UUID) -> Order:
        cart = await self._cart.view(customer_id)
        if not cart.lines:
            raise EmptyCart("the cart is empty")
        if cart.has_unavailable_lines:
            skus = [line.sku for line in cart.lines if not line.available]
            raise UnavailableItems("some cart lines cannot be ordered: " + ", ".join(skus), skus=skus)
        drafts = []
        for line in cart.lines:
            # Available lines always carry both; the asserts narrow the types.
            assert line.product_id is not None
            assert line.currency is not None
            drafts.append(
                LineDraft(
                    product_id=line.product_id,
                    sku=line.sku,
                    name=line.name,
                    unit_price_minor=line.unit_price_minor,
                    quantity=line.quantity,
                    currency=line.currency,
                )
            )
        order = place_order(order_id=new_id(), customer_id=customer_id, lines=drafts, now=self._clock.now())
        taken = [(line.sku, line.quantity) for line in cart.lines]
        await self._cart.take(customer_id, taken)
        try:
            async with self._db.write() as conn:
                await self._repo.add(conn, order)
        except Exception:
            await self._cart.restore(customer_id, taken)
            raise
        return order

    async def get(self, order_id: uuid.UUID, *, customer_id: uuid.UUID | None, read_all: bool) -> Order:
        """The order, if the caller may see it. Someone else's order is "not found", never
        "forbidden": a 403 would confirm that the id exists."""
        async with self._db.read() as conn:
            order = await self._repo.get(conn, order_id)
        if order is None or not order.visible_to(customer_id, read_all=read_all):
            raise OrderNotFound(f"order {order_id} not found")
        return order

    async def list_for_customer(
        self, customer_id: uuid.UUID, *, limit: int, after_id: uuid.UUID | None = None
    ) -> tuple[list[Order], bool]:
        """A page of the customer's orders, newest first, and whether more follow."""
        return await self._page(customer_id=customer_id, limit=limit, after_id=after_id)

    async def list_all(self, *, limit: int, after_id: uuid.UUID | None = None) -> tuple[list[Order], bool]:
        """A page of every customer's orders, newest first, and whether more follow."""
        return await self._page(customer_id=None, limit=limit, after_id=after_id)

    async def _page(
        self, *, customer_id: uuid.UUID | None, limit: int, after_id: uuid.UUID | None
    ) -> tuple[list[Order], bool]:
        async with self._db.read() as conn:
            # One extra row tells whether another page exists without a COUNT.
            rows = await self._repo.page(conn, customer_id=customer_id, after_id=after_id, limit=limit + 1)
        return rows[:limit], len(rows) > limit
