"""Cart use cases. The cart implements the orders context's `CartSource` port.

Limits are checked inside the write transaction. On SQLite that transaction holds the database
write lock, so they are exact; on PostgreSQL two concurrent adds by the same customer can each
see the other's line as absent and overshoot `max_lines` by the number of racing requests. A
customer racing themselves is the only way there, so the limit stays a guard against abuse,
not an exact count.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.storage import Database
from mercato.shop.cart.contracts import CartView
from mercato.shop.cart.model import (
    CartChanged,
    CartLimits,
    CatalogPrice,
    check_set_item,
    price_cart,
)
from mercato.shop.cart.repository import CartRepository, DuplicateItem
from mercato.shop.catalog.contracts import PriceBook, PriceQuote


def _price(quote: PriceQuote) -> CatalogPrice:
    return CatalogPrice(
        product_id=quote.product_id,
        name=quote.name,
        unit_price_minor=quote.unit_price_minor,
        currency=quote.currency,
        for_sale=quote.available_for_sale,
    )


class CartService:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        prices: PriceBook,
        limits: CartLimits,
        repository: CartRepository | None = None,
    ) -> None:
        self._db = db
        self._clock = clock
        self._prices = prices
        self._limits = limits
        self._repo = repository or CartRepository()

    @property
    def limits(self) -> CartLimits:
        return self._limits

    async def _priced(self, skus: Sequence[str]) -> dict[str, CatalogPrice]:
        if not skus:
            return {}
        quotes = await self._prices.quote_skus(list(skus))
        return {sku: _price(q) for sku, q in quotes.items()}

    async def view(self, customer_id: uuid.UUID) -> CartView:
        async with self._db.read() as conn:
            items = await self._repo.items(conn, customer_id)
        prices = await self._priced([i.sku for i in items])
        return price_cart(customer_id, items, prices)

    async def set_item(self, customer_id: uuid.UUID, sku: str, quantity: int) -> CartView:
        """Put `quantity` of `sku` in the cart (adds the line or replaces its quantity)."""
        async with self._db.read() as conn:
            before = await self._repo.items(conn, customer_id)
        # One catalog round trip for the new SKU and every line the currency rule compares with.
        prices = await self._priced(sorted({sku, *(i.sku for i in before)}))
        for attempt in range(2):
            try:
                await self._write_item(customer_id, sku, quantity, prices)
                break
            except DuplicateItem:
                # A concurrent first insert of this line won; the second pass updates it.
                if attempt == 1:
                    raise
        return await self.view(customer_id)

    async def _write_item(
        self, customer_id: uuid.UUID, sku: str, quantity: int, prices: dict[str, CatalogPrice]
    ) -> None:
        now = self._clock.now()
        async with self._db.write() as conn:
            items = await self._repo.items(conn, customer_id)
            check_set_item(items, sku, quantity, prices, self._limits)
            if not await self._repo.set_quantity(conn, customer_id, sku, quantity, now):
                await self._repo.insert(conn, customer_id, sku, quantity, now)

    async def remove_item(self, customer_id: uuid.UUID, sku: str) -> None:
        async with self._db.write() as conn:
            await self._repo.remove(conn, customer_id, sku)

    async def clear(self, customer_id: uuid.UUID) -> None:
        async with self._db.write() as conn:
            await self._repo.clear(conn, customer_id)

    async def take(
        self, customer_id: uuid.UUID, lines: Sequence[tuple[str, int]], *, conn: AsyncConnection | None = None
    ) -> None:
        """Remove exactly these lines, all or none (`CartChanged` if any changed meanwhile).

        With `conn`, the removal joins the caller's transaction (checkout commits it together
        with the order it becomes).
        """
        async with self._db.join(conn) as conn:
            # Sorted: the same lock order as any other multi-line delete, so no deadlock.
            for sku, quantity in sorted(lines):
                if not await self._repo.remove_exact(conn, customer_id, sku, quantity):
                    # Raising rolls back the lines already removed: all or none.
                    raise CartChanged(f"line {sku} changed or left the cart meanwhile", sku=sku)

    async def restore(self, customer_id: uuid.UUID, lines: Sequence[tuple[str, int]]) -> None:
        now = self._clock.now()
        async with self._db.write() as conn:
            present = await self._repo.existing_skus(conn, customer_id, [sku for sku, _ in lines])
            for sku, quantity in sorted(lines):
                if sku not in present:
                    await self._repo.insert(conn, customer_id, sku, quantity, now)
