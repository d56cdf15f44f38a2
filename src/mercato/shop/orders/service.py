"""Order use cases: turning the caller's cart into a pending order, and reading orders.

An order is written only inside a caller's transaction (`open_from_cart`, called by checkout):
the cart service joins that transaction, so the lines are taken, the order written and the saga
that will drive it started in one commit. There is deliberately no "place an order on its own"
use case: such an order would stay `pending` forever, with no saga to move it and no event to
report it.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.ids import new_id
from mercato.kit.storage import Database
from mercato.shop.cart.contracts import CartView
from mercato.shop.consistency import BACK_OFFICE_ORDERS, CUSTOMER_ORDERS
from mercato.shop.orders.contracts import OrderedItem, OrderSnapshot
from mercato.shop.orders.model import (
    EmptyCart,
    IllegalTransition,
    LineDraft,
    Order,
    OrderNotFound,
    OrderStatus,
    UnavailableItems,
    place_order,
    sources_of,
)
from mercato.shop.orders.repository import OrdersRepository


class CartSource(Protocol):
    """The cart as the orders context sees it."""

    async def view(self, customer_id: uuid.UUID, *, conn: AsyncConnection | None = None) -> CartView:
        """The cart priced now; with `conn`, read in the caller's transaction."""
        ...

    async def take_priced(self, customer_id: uuid.UUID, *, conn: AsyncConnection) -> CartView:
        """Take every line out of the cart, priced now, in the caller's transaction: a caller that
        refuses them raises, and the rollback puts them back."""
        ...


class CheckoutProgress(Protocol):
    """Where an order's checkout stands (implemented by the checkout context)."""

    async def progress(self, order_id: uuid.UUID, *, internal: bool = False) -> dict[str, Any] | None: ...


class OrdersService:
    def __init__(
        self, db: Database, clock: Clock, cart: CartSource, repository: OrdersRepository | None = None
    ) -> None:
        self._db = db
        self._clock = clock
        self._cart = cart
        self._repo = repository or OrdersRepository()
        self._progress: CheckoutProgress | None = None

    def attach_checkout(self, progress: CheckoutProgress) -> None:
        """Checkout is built after orders (it needs them), so it is attached afterwards."""
        self._progress = progress

    async def checkout_progress(
        self, order_id: uuid.UUID, *, internal: bool = False
    ) -> dict[str, Any] | None:
        """The checkout's progress; `internal` (staff) adds the failure text and each attempt's error."""
        if self._progress is None:
            return None
        return await self._progress.progress(order_id, internal=internal)

    async def draft_from_cart(self, customer_id: uuid.UUID, *, conn: AsyncConnection | None = None) -> Order:
        """A pending order priced from the cart as it is now; nothing is written yet. With `conn`,
        the cart is read in the caller's transaction."""
        return self._draft(customer_id, await self._cart.view(customer_id, conn=conn))

    def _draft(self, customer_id: uuid.UUID, cart: CartView) -> Order:
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
        return place_order(order_id=new_id(), customer_id=customer_id, lines=drafts, now=self._clock.now())

    async def open_from_cart(self, conn: AsyncConnection, customer_id: uuid.UUID) -> OrderSnapshot:
        """Take the cart's lines, priced, and record the order they make, in the caller's
        transaction (checkout's): the lines are taken and read by one statement on PostgreSQL, so
        the order is priced from exactly the lines it took. A refused cart (empty, unavailable
        lines) raises, and the caller's rollback puts its lines back."""
        order = self._draft(customer_id, await self._cart.take_priced(customer_id, conn=conn))
        await self._repo.add(conn, order)
        return snapshot(order)

    async def move_to(
        self,
        order_id: uuid.UUID,
        status: str,
        *,
        conn: AsyncConnection | None = None,
        at: datetime | None = None,
    ) -> None:
        """`transition` by status name, for contexts that only know the contract (saga steps).
        `at` is the moment recorded (`updated_at`; now by default), so an event announcing the move
        can carry the very same time."""
        target = OrderStatus(status)
        async with self._db.join(conn) as tx:
            # The usual case in one statement: the order is in a state that may become `target`.
            moved = await self._repo.set_status_from(
                tx, order_id, sources=sources_of(target), target=target, now=at or self._clock.now()
            )
            if not moved:
                # Already there (a no-op), not found or not allowed: `transition` says which.
                await self.transition(order_id, target, conn=tx)

    async def transition(
        self, order_id: uuid.UUID, target: OrderStatus, *, conn: AsyncConnection | None = None
    ) -> Order:
        """Move the order to `target` if its state allows (idempotent when it is already there)."""
        async with self._db.join(conn) as tx:
            order = await self._repo.get(tx, order_id)
            if order is None:
                raise OrderNotFound(f"order {order_id} not found")
            if order.status is target:
                return order
            if not order.can_become(target):
                raise IllegalTransition(
                    f"order {order_id} is {order.status.value}, cannot become {target.value}"
                )
            now = self._clock.now()
            if not await self._repo.set_status(tx, order_id, expected=order.status, target=target, now=now):
                raise IllegalTransition(f"order {order_id} changed state concurrently")
            return replace(order, status=target, version=order.version + 1, updated_at=now)

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
        staleness = CUSTOMER_ORDERS if customer_id is not None else BACK_OFFICE_ORDERS
        async with self._db.read(staleness=staleness) as conn:
            # One extra row tells whether another page exists without a COUNT.
            rows = await self._repo.page(conn, customer_id=customer_id, after_id=after_id, limit=limit + 1)
        return rows[:limit], len(rows) > limit

    # ---- for read-model reconciliation (reporting's `OrderFacts`) -------------------------------

    async def settled_snapshots(
        self, *, settled_before: datetime, after_id: uuid.UUID | None = None, limit: int = 500
    ) -> list[OrderSnapshot]:
        """A page (id order, after `after_id`) of orders unchanged since before `settled_before`."""
        async with self._db.read() as conn:
            found = await self._repo.settled(
                conn, settled_before=settled_before, after_id=after_id, limit=limit
            )
        return [snapshot(o) for o in found]

    async def sample_settled(
        self, *, settled_before: datetime, size: int, rng: random.Random
    ) -> list[OrderSnapshot]:
        """About `size` settled orders from a random point of the id range (wrapping around): a
        cheap sample, one index range scan, that covers the whole history over repeated calls."""
        async with self._db.read() as conn:
            bounds = await self._repo.id_bounds(conn)
            if bounds is None:
                return []
            low, high = bounds[0].int, bounds[1].int
            pivot = uuid.UUID(int=rng.randint(low, high))
            first = await self._repo.settled(conn, settled_before=settled_before, after_id=pivot, limit=size)
            rest = size - len(first)
            wrapped = (
                await self._repo.settled(conn, settled_before=settled_before, after_id=None, limit=rest)
                if rest > 0
                else []
            )
        seen = {o.id for o in first}
        return [snapshot(o) for o in first + [o for o in wrapped if o.id not in seen]]

    async def completed_between(
        self, *, start: datetime, end: datetime, page: int = 1000
    ) -> list[OrderSnapshot]:
        """Every order that completed in [start, end) (their `updated_at` is the completion time)."""
        out: list[OrderSnapshot] = []
        after: uuid.UUID | None = None
        async with self._db.read() as conn:
            while True:
                found = await self._repo.completed_between(
                    conn, start=start, end=end, after_id=after, limit=page
                )
                out += [snapshot(o) for o in found]
                if len(found) < page:
                    return out
                after = found[-1].id

    async def existing(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Which of `ids` are orders."""
        async with self._db.read() as conn:
            return await self._repo.existing_ids(conn, ids)


def snapshot(order: Order) -> OrderSnapshot:
    return OrderSnapshot(
        id=order.id,
        customer_id=order.customer_id,
        status=order.status.value,
        currency=order.currency,
        total_minor=order.total_minor,
        items=tuple(
            OrderedItem(
                sku=line.sku,
                product_id=line.product_id,
                quantity=line.quantity,
                unit_price_minor=line.unit_price_minor,
            )
            for line in order.lines
        ),
        updated_at=order.updated_at,
    )
