"""Cart use cases. The cart implements the orders context's `CartSource` port.

Limits are checked inside the write transaction. On SQLite that transaction holds the database
write lock, so they are exact; on PostgreSQL two concurrent adds by the same customer can each
see the other's line as absent and overshoot `max_lines` by the number of racing requests. A
customer racing themselves is the only way there, so the limit stays a guard against abuse,
not an exact count.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

from sqlalchemy import CompoundSelect, Row, Select
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.storage import Database
from mercato.kit.storage.statements import Executor, Statements, driver_prepared, driver_read_then_write
from mercato.kit.storage.statements_in_tx import on_connection
from mercato.shop.cart.contracts import CartView
from mercato.shop.cart.model import (
    CartChanged,
    CartItem,
    CartLimits,
    CatalogPrice,
    check_set_item,
    price_cart,
)
from mercato.shop.cart.repository import CartRepository, item_from_row
from mercato.shop.catalog.contracts import PriceQuote


class CartPrices(Protocol):
    """The catalog as the cart uses it (implemented by CatalogService): quotes joined onto the
    cart's own rows in one statement, on the cart's connection."""

    def quoting(self, keyed: Select[Any] | CompoundSelect[Any]) -> Select[Any]: ...

    async def quoted_rows(
        self, conn: AsyncConnection, statement: Select[Any], params: Mapping[str, Any]
    ) -> list[tuple[Row[Any], PriceQuote | None]]: ...


class _NamedRow:
    """A driver row with SQLAlchemy's `Row` face as `quoted_rows` and `item_from_row` read it:
    columns by attribute and through `_mapping`."""

    __slots__ = ("_mapping",)

    def __init__(self, mapping: dict[str, Any]) -> None:
        self._mapping = mapping

    def __getattr__(self, name: str) -> Any:
        try:
            return self._mapping[name]
        except KeyError:
            raise AttributeError(name) from None


class _NamedRows:
    """A driver-path transaction (`Executor`) in the shape `CartPrices.quoted_rows` runs its
    statement on (`await conn.execute(statement, params)`, rows with named columns)."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    async def execute(self, statement: Select[Any], params: dict[str, Any]) -> list[_NamedRow]:
        names = [str(column.key) for column in statement.selected_columns]
        rows = await self._executor.rows(statement, params)
        return [_NamedRow(dict(zip(names, row, strict=True))) for row in rows]


def _price(quote: PriceQuote) -> CatalogPrice:
    return CatalogPrice(
        product_id=quote.product_id,
        name=quote.name,
        unit_price_minor=quote.unit_price_minor,
        currency=quote.currency,
        for_sale=quote.available_for_sale,
    )


def _first_untaken(lines: Sequence[tuple[str, int]], taken: set[str]) -> str | None:
    """The first SKU, in order, that the DELETE did not remove (a SKU asked twice is removed once)."""
    asked = Counter(sku for sku, _ in lines)
    return next((sku for sku in sorted(asked) if sku not in taken or asked[sku] > 1), None)


class CartService:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        prices: CartPrices,
        limits: CartLimits,
        repository: CartRepository | None = None,
    ) -> None:
        self._db = db
        self._clock = clock
        self._prices = prices
        self._limits = limits
        self._repo = repository or CartRepository()
        # Checkout reads the priced cart in its own transaction, on the raw driver under it.
        self._priced_lines = driver_prepared(prices.quoting(self._repo.lines_statement(with_probe=False)))
        # Checkout's take of the whole cart, priced: one statement on PostgreSQL (the lines deleted
        # by a data-modifying CTE, joined with their quotes); on SQLite the priced read, then the
        # delete, in the caller's write transaction (SQLite's one write lock: nothing in between).
        self._taken_priced_lines = driver_prepared(
            prices.quoting(self._repo.taken_lines_statement()),
            in_turn=(self._priced_lines, self._repo.take_all_statement()),
        )
        # Putting a line (the checkout bench's first request) runs on the raw driver.
        self._priced_lines_and_sku = driver_prepared(
            prices.quoting(self._repo.lines_statement(with_probe=True))
        )
        self._statements = Statements(db.engine.dialect)

    @property
    def limits(self) -> CartLimits:
        return self._limits

    async def _read(
        self,
        conn: AsyncConnection | _NamedRows,
        customer_id: uuid.UUID,
        also: str | None = None,
        *,
        statement: Select[Any] | None = None,
    ) -> tuple[list[CartItem], dict[str, CatalogPrice]]:
        """The lines and the prices of their SKUs (and of `also`), in one SELECT on `conn` (or
        `statement`, which reads the lines as that SELECT does)."""
        statement = self._priced_lines if statement is None else statement
        params: dict[str, Any] = {"customer_id": customer_id}
        if also is not None:
            statement, params["probe_sku"] = self._priced_lines_and_sku, also
        items: list[CartItem] = []
        prices: dict[str, CatalogPrice] = {}
        for row, quote in await self._prices.quoted_rows(cast(AsyncConnection, conn), statement, params):
            item = item_from_row(row)
            if item is not None:
                items.append(item)
            if quote is not None:
                prices[quote.sku] = _price(quote)
        return items, prices

    async def view(self, customer_id: uuid.UUID, *, conn: AsyncConnection | None = None) -> CartView:
        """The cart priced now; with `conn`, read in the caller's transaction (checkout prices the
        order it writes from the very lines it takes)."""
        if conn is not None:
            return price_cart(customer_id, *await self._read(_NamedRows(on_connection(conn)), customer_id))
        async with self._db.read() as own:
            return price_cart(customer_id, *await self._read(own, customer_id))

    async def take_priced(self, customer_id: uuid.UUID, *, conn: AsyncConnection) -> CartView:
        """Take every line out of the cart, priced now, in the caller's transaction (checkout's):
        one statement on PostgreSQL, where a read and then a take of exactly those lines were two.
        The order is priced from the very lines it takes, so no line can change in between (no
        `CartChanged`); a caller that refuses the cart (empty, unavailable lines) raises, and its
        transaction's rollback puts the lines back."""
        rows = _NamedRows(on_connection(conn))
        items, prices = await self._read(rows, customer_id, statement=self._taken_priced_lines)
        return price_cart(customer_id, items, prices)

    async def set_item(self, customer_id: uuid.UUID, sku: str, quantity: int) -> CartView:
        """Put `quantity` of `sku` in the cart (adds the line or replaces its quantity).

        One read and one write (`driver_read_then_write`: on PostgreSQL no BEGIN/COMMIT around
        them, which READ COMMITTED would not make any safer; on SQLite one write transaction): the
        rules see the lines and prices it reads, and the cart it answers with is those lines with
        this change applied, so no second read is needed.
        """
        now = self._clock.now()
        refused: Exception | None = None
        async with driver_read_then_write(self._db, self._statements) as tx:
            before, prices = await self._read(_NamedRows(tx), customer_id, also=sku)
            try:
                check_set_item(before, sku, quantity, prices, self._limits)
            except Exception as exc:  # noqa: BLE001 - raised below, once the read-only scope ended
                refused = exc  # raised here it would discard the driver connection, not just roll back
            else:
                added_at = await self._repo.upsert_on(
                    tx, self._db.engine.dialect, customer_id, sku, quantity, now
                )
        if refused is not None:
            raise refused
        after = [item for item in before if item.sku != sku]
        after.append(CartItem(sku, quantity, added_at, now))
        return price_cart(customer_id, after, prices)

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
            # One DELETE matching (sku, quantity): a line edited or removed meanwhile is not
            # deleted, and RETURNING says which were. Its row locks are taken in index order, as
            # by any other such DELETE, so concurrent takes cannot deadlock.
            taken = await self._repo.take_exactly(conn, customer_id, lines)
            sku = _first_untaken(lines, taken)
            if sku is not None:
                # Raising rolls back the lines already removed: all or none.
                raise CartChanged(f"line {sku} changed or left the cart meanwhile", sku=sku)
