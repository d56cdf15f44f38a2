from __future__ import annotations

import random

import pytest

from mercato.bootstrap import Container
from mercato.demo.seed import demo_products
from mercato.shop.catalog.model import DuplicateSku, NewProduct, ProductQuery, ProductSort


async def _seed(container: Container, count: int = 150) -> None:
    await container.catalog.create_many(demo_products(count, random.Random(7)))


@pytest.mark.parametrize("sort", list(ProductSort))
async def test_keyset_pages_cover_every_live_product_once_in_order(
    container: Container, sort: ProductSort
) -> None:
    await _seed(container)
    seen = []
    query = ProductQuery(limit=17, sort=sort)
    while True:
        page, more = await container.catalog.browse(query)
        seen.extend(page)
        if not more:
            break
        last = page[-1]
        query = ProductQuery(limit=17, sort=sort, after_value=last.sort_value(sort), after_id=last.id)
    assert len(seen) == 150
    assert len({p.id for p in seen}) == 150
    keys = [(p.sort_value(sort), p.id) for p in seen] if sort.key != "created_at" else [p.id for p in seen]
    assert keys == sorted(keys, reverse=sort.descending)  # type: ignore[type-var]


async def test_filters_combine(container: Container) -> None:
    await _seed(container)
    page, _ = await container.catalog.browse(
        ProductQuery(limit=100, category="books", min_price_minor=1000, max_price_minor=20000)
    )
    assert page
    assert all(p.category == "books" and 1000 <= p.price_minor <= 20000 for p in page)


async def test_name_search_is_case_insensitive_and_escapes_wildcards(container: Container) -> None:
    await container.catalog.create(
        NewProduct(
            sku="X-100", name="Blue 100% Cotton Shirt", price_minor=1, currency="EUR", category="fashion"
        )
    )
    await container.catalog.create(
        NewProduct(
            sku="X-101", name="Blue 1000 Cotton Shirt", price_minor=1, currency="EUR", category="fashion"
        )
    )
    page, _ = await container.catalog.browse(ProductQuery(search="cotton"))
    assert len(page) == 2
    page, _ = await container.catalog.browse(ProductQuery(search="100%"))
    assert [p.sku for p in page] == ["X-100"]


async def test_archived_products_leave_the_public_list(container: Container) -> None:
    await _seed(container, 5)
    page, _ = await container.catalog.browse(ProductQuery())
    await container.catalog.archive(page[0].id)
    after, _ = await container.catalog.browse(ProductQuery())
    assert page[0].id not in {p.id for p in after}
    assert len(after) == 4


async def test_duplicate_sku_is_a_conflict_not_a_crash(container: Container) -> None:
    await container.catalog.create(
        NewProduct(sku="DUP-1", name="a", price_minor=1, currency="EUR", category="books")
    )
    with pytest.raises(DuplicateSku):
        await container.catalog.create(
            NewProduct(sku="DUP-1", name="b", price_minor=1, currency="EUR", category="books")
        )
