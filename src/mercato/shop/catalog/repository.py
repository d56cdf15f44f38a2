"""Catalog persistence: the catalog's tables and the queries on them (this context alone)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Row,
    Select,
    bindparam,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.storage.statements import DriverReads, driver_prepared
from mercato.shop.catalog.model import DuplicateSku, Product, ProductQuery, ProductSort
from mercato.shop.catalog.tables import products

_SORT_COLUMNS: dict[str, Any] = {
    "created_at": None,
    "price": products.c.price_minor,
    "name": products.c.name,
}


# Built once and run on the raw driver (kit/storage/statements.py): the hottest read is one round
# trip on asyncpg's connection (one thread hop on SQLite), without SQLAlchemy's adapter per call.
_GET_BY_ID = driver_prepared(select(products).where(products.c.id == bindparam("product_id")))
_COLUMNS = tuple(column.name for column in products.columns)

# What a price quote needs, and no more: the description and the attributes (JSON) are the bulk of
# a row and quoting never reads them.
_QUOTE_COLUMNS = (
    products.c.id,
    products.c.sku,
    products.c.name,
    products.c.price_minor,
    products.c.currency,
    products.c.archived,
)
# Prefixed, so the caller's own columns (its `sku` first) keep their names beside them.
QUOTE_PREFIX = "quote_"


def _row_to_product(row: Any) -> Product:
    return Product(
        id=row.id,
        sku=row.sku,
        name=row.name,
        description=row.description,
        price_minor=row.price_minor,
        currency=row.currency,
        category=row.category,
        attributes=dict(row.attributes or {}),
        archived=bool(row.archived),
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _values(product: Product) -> dict[str, Any]:
    return {
        "id": product.id,
        "sku": product.sku,
        "name": product.name,
        "description": product.description,
        "price_minor": product.price_minor,
        "currency": product.currency,
        "category": product.category,
        "attributes": product.attributes,
        "archived": product.archived,
        "version": product.version,
        "created_at": product.created_at,
        "updated_at": product.updated_at,
    }


class _Row:
    """A driver-path tuple read by column name, as `_row_to_product` reads a SQLAlchemy row."""

    __slots__ = ("_values",)

    def __init__(self, values: tuple[Any, ...]) -> None:
        self._values = dict(zip(_COLUMNS, values, strict=True))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None


class CatalogRepository:
    """Queries on `catalog_products`. Every method runs on the connection it is given."""

    async def get(self, conn: AsyncConnection, product_id: uuid.UUID) -> Product | None:
        row = (await conn.execute(_GET_BY_ID, {"product_id": product_id})).first()
        return _row_to_product(row) if row else None

    async def get_hot(self, reads: DriverReads, product_id: uuid.UUID) -> Product | None:
        """`get` on the raw driver: one autocommitted statement, no SQLAlchemy connection."""
        rows = await reads.rows(_GET_BY_ID, {"product_id": product_id})
        return _row_to_product(_Row(rows[0])) if rows else None

    async def get_many(self, conn: AsyncConnection, ids: Sequence[uuid.UUID]) -> list[Product]:
        if not ids:
            return []
        rows = await conn.execute(select(products).where(products.c.id.in_(list(ids))))
        return [_row_to_product(r) for r in rows]

    async def get_by_skus(self, conn: AsyncConnection, skus: Sequence[str]) -> list[Product]:
        if not skus:
            return []
        rows = await conn.execute(select(products).where(products.c.sku.in_(list(skus))))
        return [_row_to_product(r) for r in rows]

    async def quote_rows_by_skus(self, conn: AsyncConnection, skus: Sequence[str]) -> list[Row[Any]]:
        if not skus:
            return []
        return list(await conn.execute(select(*_QUOTE_COLUMNS).where(products.c.sku.in_(list(skus)))))

    @staticmethod
    def with_quote_columns(keyed: Select[Any] | CompoundSelect[Any]) -> Select[Any]:
        """Every row of `keyed` (a SELECT with a `sku` column) beside the quote columns of the product
        with that SKU, each named `QUOTE_PREFIX + column` (all NULL when the catalog has no such SKU).

        One statement instead of a read of the caller's rows and then one of their products.
        """
        rows = keyed.subquery("keyed")
        quoted = [column.label(QUOTE_PREFIX + column.name) for column in _QUOTE_COLUMNS]
        return select(rows, *quoted).select_from(rows.outerjoin(products, products.c.sku == rows.c.sku))

    async def add(self, conn: AsyncConnection, product: Product) -> None:
        try:
            await conn.execute(insert(products).values(**_values(product)))
        except IntegrityError as exc:
            raise DuplicateSku(f"a product with SKU {product.sku} already exists", field="sku") from exc

    async def add_many(self, conn: AsyncConnection, batch: Sequence[Product]) -> None:
        if batch:
            await conn.execute(insert(products), [_values(p) for p in batch])

    async def save(self, conn: AsyncConnection, product: Product, *, expected_version: int) -> bool:
        """Write `product` if the stored version is still `expected_version` (optimistic lock)."""
        values = _values(product)
        values.pop("id")
        values.pop("created_at")
        result = await conn.execute(
            update(products)
            .where(products.c.id == product.id, products.c.version == expected_version)
            .values(**values)
        )
        return result.rowcount == 1

    async def count(self, conn: AsyncConnection) -> int:
        return int((await conn.execute(select(func.count()).select_from(products))).scalar_one())

    async def change_stamp(self, conn: AsyncConnection) -> str:
        """A value every committed change moves: the rows and the sum of their versions (a create adds a
        row, an update or an archive bumps one version, nothing deletes a product)."""
        stamp = select(func.count(), func.coalesce(func.sum(products.c.version), 0)).select_from(products)
        count, versions = (await conn.execute(stamp)).one()
        return f"{int(count)}.{int(versions)}"

    async def page(self, conn: AsyncConnection, query: ProductQuery) -> list[Product]:
        """One keyset page; fetches `limit + 1` rows so the caller knows whether more exist."""
        # `NOT archived` (SQLite: `archived = 0`) is the partial indexes' predicate word for word;
        # `archived IS false` is not, and the planners then fall back to a full scan and a sort.
        stmt = select(products).where(~products.c.archived)
        if query.category is not None:
            stmt = stmt.where(products.c.category == query.category)
        if query.min_price_minor is not None:
            stmt = stmt.where(products.c.price_minor >= query.min_price_minor)
        if query.max_price_minor is not None:
            stmt = stmt.where(products.c.price_minor <= query.max_price_minor)
        if query.search and query.search_words:
            for word in query.search.split()[:8]:
                stmt = stmt.where(products.c.name.ilike(f"%{_escape_like(word)}%", escape="\\"))
        elif query.search:
            stmt = stmt.where(products.c.name.ilike(f"%{_escape_like(query.search)}%", escape="\\"))
        column = _SORT_COLUMNS[query.sort.key]
        order: list[Any]
        if query.after_id is not None:
            stmt = stmt.where(_after(column, query.sort, query.after_value, query.after_id))
        if column is None:
            order = [products.c.id.desc() if query.sort.descending else products.c.id.asc()]
        elif query.sort.descending:
            order = [column.desc(), products.c.id.desc()]
        else:
            order = [column.asc(), products.c.id.asc()]
        stmt = stmt.order_by(*order).limit(query.limit + 1)
        return [_row_to_product(r) for r in await conn.execute(stmt)]


def _after(column: Any, sort: ProductSort, value: Any, after_id: uuid.UUID) -> ColumnElement[bool]:
    if column is None:
        return products.c.id < after_id if sort.descending else products.c.id > after_id
    # A row-value comparison matches the (column, id) index order on both planners.
    if sort.descending:
        return tuple_(column, products.c.id) < tuple_(value, after_id)
    return tuple_(column, products.c.id) > tuple_(value, after_id)


def _escape_like(term: str) -> str:
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
