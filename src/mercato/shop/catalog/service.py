"""Catalog use cases."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any

from sqlalchemy import CompoundSelect, Row, Select
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.errors import Conflict, PreconditionFailed
from mercato.kit.ids import new_id
from mercato.kit.messaging import Outbox
from mercato.kit.observability import get_logger
from mercato.kit.storage import Database
from mercato.kit.storage.statements import DriverReads
from mercato.shop.catalog.contracts import PriceQuote
from mercato.shop.catalog.events import Change, ProductEvents
from mercato.shop.catalog.model import (
    NewProduct,
    Product,
    ProductChanges,
    ProductNotFound,
    ProductQuery,
)
from mercato.shop.catalog.repository import QUOTE_PREFIX, CatalogRepository
from mercato.shop.consistency import CATALOG_BROWSE


class ConcurrentProductUpdate(Conflict):
    slug = "concurrent-update"
    title = "Concurrent update"
    description = "The resource changed while this update was being applied; fetch it and retry."


class StaleProduct(PreconditionFailed):
    slug = "precondition-failed"
    title = "Precondition failed"
    description = (
        "The resource changed since the ETag sent in `If-Match` was issued; GET it again, reapply "
        "the change and retry with the new ETag."
    )


_log = get_logger("mercato.catalog")

ChangeListener = Callable[[uuid.UUID], Awaitable[None]]


class CatalogService:
    """With an `outbox`, each create/update/archive writes `mercato.catalog.product_changed` in its
    own transaction; `on_change` listeners (the product cache) hear of it right after the commit,
    so the writing process does not wait for the event's round trip through the stream."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        repository: CatalogRepository | None = None,
        *,
        outbox: Outbox | None = None,
        events: ProductEvents | None = None,
    ) -> None:
        self._db = db
        self._clock = clock
        self._repo = repository or CatalogRepository()
        self._reads = DriverReads(db)  # the hot reads on the raw driver (kit/storage/statements.py)
        self._outbox = outbox
        self._events = events or ProductEvents(clock=clock)
        self._listeners: list[ChangeListener] = []

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    async def _record(self, conn: AsyncConnection, product: Product, change: Change) -> None:
        if self._outbox is not None:
            await self._outbox.add(conn, self._events.changed(product, change))

    async def _changed(self, product_id: uuid.UUID) -> None:
        """Tell the listeners; the write is committed, so a failing listener (Redis down) is logged,
        not raised: the outbox event reaches the caches' invalidation anyway, only later."""
        for listener in self._listeners:
            try:
                await listener(product_id)
            except Exception as exc:  # noqa: BLE001 - the committed write must not turn into a 5xx
                _log.warning("product_change_listener_failed", product_id=str(product_id), error=repr(exc))

    async def get(self, product_id: uuid.UUID, *, include_archived: bool = False) -> Product:
        product = await self._repo.get_hot(self._reads, product_id)
        if product is None or (product.archived and not include_archived):
            raise ProductNotFound(f"product {product_id} not found")
        return product

    async def browse(self, query: ProductQuery, *, primary: bool = False) -> tuple[list[Product], bool]:
        """A page of live products and whether another page follows. `primary`: never from a replica (a
        page the application cache keeps for a minute must not be a lagging replica's)."""
        async with self._db.read(staleness=None if primary else CATALOG_BROWSE) as conn:
            rows = await self._repo.page(conn, query)
        return rows[: query.limit], len(rows) > query.limit

    async def change_stamp(self) -> str:
        """What the cached category pages are keyed by: it moves with every committed product change
        (from the primary), so a page cached before a change is never found after it."""
        async with self._db.read() as conn:
            return await self._repo.change_stamp(conn)

    async def create(self, draft: NewProduct) -> Product:
        product = draft.create(product_id=new_id(), now=self._clock.now())
        async with self._db.write() as conn:
            await self._repo.add(conn, product)
            await self._record(conn, product, "created")
        await self._changed(product.id)
        return product

    async def create_many(self, drafts: Sequence[NewProduct]) -> list[Product]:
        now = self._clock.now()
        batch = [d.create(product_id=new_id(), now=now) for d in drafts]
        async with self._db.write() as conn:
            await self._repo.add_many(conn, batch)
        return batch

    async def update(
        self,
        product_id: uuid.UUID,
        changes: ProductChanges,
        *,
        expected_versions: Collection[int] | None = None,
    ) -> Product:
        """Apply `changes`; with `expected_versions` (an If-Match), only to one of those versions.

        The version check is the UPDATE's own `WHERE version = :expected` (the version read, once
        it is one the caller named), so two writers holding
        the same version cannot both win: the second one's UPDATE matches no row and it gets
        `StaleProduct` (412), never a silent overwrite. The read before it only tells a stale
        version (412) from a missing product (404) and computes the new values.
        """
        async with self._db.write() as conn:
            current = await self._repo.get(conn, product_id)
            if current is None:
                raise ProductNotFound(f"product {product_id} not found")
            if expected_versions is not None and current.version not in expected_versions:
                raise StaleProduct(f"product {product_id} is at a newer version than If-Match names")
            updated = current.with_changes(changes, now=self._clock.now())
            if updated is current:
                return current
            if not await self._repo.save(conn, updated, expected_version=current.version):
                if expected_versions is not None:
                    raise StaleProduct(f"product {product_id} was changed by a concurrent update")
                raise ConcurrentProductUpdate(f"product {product_id} was changed concurrently")
            await self._record(conn, updated, "updated")
        await self._changed(product_id)
        return updated

    async def archive(self, product_id: uuid.UUID) -> Product:
        async with self._db.write() as conn:
            current = await self._repo.get(conn, product_id)
            if current is None:
                raise ProductNotFound(f"product {product_id} not found")
            archived = current.archive(now=self._clock.now())
            if archived is current:
                return archived
            if not await self._repo.save(conn, archived, expected_version=current.version):
                raise ConcurrentProductUpdate(f"product {product_id} was changed concurrently")
            await self._record(conn, archived, "archived")
        await self._changed(product_id)
        return archived

    async def count(self) -> int:
        async with self._db.read() as conn:
            return await self._repo.count(conn)

    async def quote(self, product_ids: list[uuid.UUID]) -> dict[uuid.UUID, PriceQuote]:
        async with self._db.read() as conn:
            found = await self._repo.get_many(conn, product_ids)
        return {p.id: _quote(p) for p in found}

    async def quote_skus(self, skus: list[str]) -> dict[str, PriceQuote]:
        async with self._db.read() as conn:
            rows = await self._repo.quote_rows_by_skus(conn, sorted(set(skus)))
        return {quote.sku: quote for quote in map(_quote_from_columns, rows)}

    def quoting(self, keyed: Select[Any] | CompoundSelect[Any]) -> Select[Any]:
        """A statement for `quoted_rows`: `keyed` (a SELECT with a `sku` column) with each row's quote.

        Build it once and keep it: executing the same statement object again skips SQLAlchemy's
        statement construction and cache-key work, which costs as much CPU as a round trip does.
        """
        return self._repo.with_quote_columns(keyed)

    async def quoted_rows(
        self, conn: AsyncConnection, statement: Select[Any], params: Mapping[str, Any]
    ) -> list[tuple[Row[Any], PriceQuote | None]]:
        """Run a `quoting` statement on the caller's connection (so in its transaction): each of its
        rows with the quote for its SKU, archived products included (flagged), None for an unknown SKU.
        """
        rows = await conn.execute(statement, dict(params))
        return [(row, _joined_quote(row)) for row in rows]


def _quote_from_columns(row: Any, prefix: str = "") -> PriceQuote:
    columns = row._mapping
    return PriceQuote(
        product_id=columns[prefix + "id"],
        sku=columns[prefix + "sku"],
        name=columns[prefix + "name"],
        unit_price_minor=int(columns[prefix + "price_minor"]),
        currency=columns[prefix + "currency"],
        available_for_sale=not columns[prefix + "archived"],
    )


def _joined_quote(row: Row[Any]) -> PriceQuote | None:
    # The outer join leaves every quote column NULL when no product has the row's SKU.
    if row._mapping[QUOTE_PREFIX + "id"] is None:
        return None
    return _quote_from_columns(row, QUOTE_PREFIX)


def _quote(product: Product) -> PriceQuote:
    return PriceQuote(
        product_id=product.id,
        sku=product.sku,
        name=product.name,
        unit_price_minor=product.price_minor,
        currency=product.currency,
        available_for_sale=not product.archived,
    )
