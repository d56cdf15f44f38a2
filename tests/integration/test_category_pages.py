"""Category first pages from the application cache (ADR 0061): `GET /v1/products?category=C` is served
from stored bytes with a strong ETag, revalidated (304) without a database statement, answered by the
edge exactly as the route answers it, and dropped by every product change (no stale page survives a
change, not even one loaded while the change committed) and by a purge of its `Surrogate-Key` tags."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from mercato.bootstrap import Container
from mercato.gateway.fast_reads import LIST_ROUTE
from mercato.shop.catalog.api import router as catalog_router
from mercato.shop.catalog.model import NewProduct, Product, ProductChanges
from tests.integration.edge_apps import client_for, shop_app
from tests.integration.statement_budget import counting

_PER_REQUEST = {"x-request-id", "date"}
PAGE = "/v1/products?category=books"


@pytest.fixture
def list_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The apps whose list route itself ran (after routing matched it)."""
    calls: list[object] = []
    route = next(
        r
        for r in catalog_router.routes
        if isinstance(r, APIRoute) and r.path == LIST_ROUTE and "GET" in r.methods
    )
    original = route.handle

    async def handle(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope.get("app"))
        await original(scope, receive, send)

    monkeypatch.setattr(route, "handle", handle)
    return calls


async def _book(container: Container, sku: str, price_minor: int, category: str = "books") -> Product:
    return await container.catalog.create(
        NewProduct(sku=sku, name=f"Book {sku}", price_minor=price_minor, currency="EUR", category=category)
    )


def _ids(response: httpx.Response) -> list[str]:
    return [item["id"] for item in response.json()["items"]]


async def test_a_category_page_is_cached_with_an_etag_and_revalidated_without_the_database(
    container: Container, list_calls: list[object]
) -> None:
    first_book, second_book = await _book(container, "PAGE-1", 900), await _book(container, "PAGE-2", 1900)
    await _book(container, "PAGE-3", 500, category="music")
    app = shop_app(container)
    async with client_for(app) as client:
        first = await client.get(PAGE)
        with counting(container) as tally:
            again = await client.get(PAGE)
            revalidated = await client.get(PAGE, headers={"If-None-Match": first.headers["etag"]})
            with_sort = await client.get(PAGE + "&sort=price&limit=5", headers={"If-None-Match": '"other"'})
    assert first.status_code == again.status_code == 200
    assert _ids(first) == [str(second_book.id), str(first_book.id)]
    assert again.content == first.content
    assert revalidated.status_code == 304
    assert revalidated.content == b""
    assert revalidated.headers["etag"] == first.headers["etag"]
    # Inside the block only the listing not read before (another sort and limit) reached the database.
    assert len(tally.statements) == 1, tally.report()
    assert _ids(with_sort) == [str(first_book.id), str(second_book.id)]
    keys = first.headers["surrogate-key"].split()
    assert keys[:2] == ["products", "category:books"]
    assert set(keys[2:]) == {f"product:{first_book.id}", f"product:{second_book.id}"}
    assert revalidated.headers["surrogate-key"] == first.headers["surrogate-key"]
    assert first.headers["cache-control"].startswith("public, max-age=")
    assert list_calls == [], "the edge should answer a category page without routing"


async def test_the_edge_answers_a_category_page_exactly_as_the_route_does(
    container: Container, list_calls: list[object]
) -> None:
    await _book(container, "SAME-1", 100)
    await _book(container, "SAME-2", 200)
    fast_app, slow_app = shop_app(container), shop_app(container, fast=False)
    async with client_for(fast_app) as fast, client_for(slow_app) as slow:
        for url in (PAGE, PAGE + "&limit=1", PAGE + "&sort=-price"):
            by_edge, by_route = await fast.get(url), await slow.get(url)
            assert by_edge.status_code == by_route.status_code == 200
            assert by_edge.content == by_route.content
            same = [(k, v) for k, v in by_edge.headers.multi_items() if k not in _PER_REQUEST]
            assert same == [(k, v) for k, v in by_route.headers.multi_items() if k not in _PER_REQUEST]
            tag = {"If-None-Match": by_edge.headers["etag"]}
            by_edge, by_route = await fast.get(url, headers=tag), await slow.get(url, headers=tag)
            assert by_edge.status_code == by_route.status_code == 304
            same = [(k, v) for k, v in by_edge.headers.multi_items() if k not in _PER_REQUEST]
            assert same == [(k, v) for k, v in by_route.headers.multi_items() if k not in _PER_REQUEST]
        # What is not a cacheable first page goes on to the route (a price range; a limit it refuses).
        assert (await fast.get(PAGE + "&min_price_minor=150")).status_code == 200
        assert (await fast.get(PAGE + "&limit=0")).status_code == 400
    assert [app for app in list_calls if app is fast_app] == [fast_app, fast_app]


async def test_a_changed_product_leaves_the_cached_page_at_once(container: Container) -> None:
    moved, priced = await _book(container, "MOVE-1", 300), await _book(container, "MOVE-2", 400)
    app = shop_app(container)
    async with client_for(app) as client:
        before = await client.get(PAGE)
        assert set(_ids(before)) == {str(moved.id), str(priced.id)}
        await container.catalog.update(moved.id, ProductChanges(category="music"))
        after_move = await client.get(PAGE)
        assert _ids(after_move) == [str(priced.id)]
        assert after_move.headers["etag"] != before.headers["etag"]
        # The old ETag no longer revalidates: the client gets the new page.
        stale_tag = await client.get(PAGE, headers={"If-None-Match": before.headers["etag"]})
        assert stale_tag.status_code == 200
        assert _ids(stale_tag) == [str(priced.id)]
        await container.catalog.update(priced.id, ProductChanges(price_minor=4100))
        assert (await client.get(PAGE)).json()["items"][0]["price_minor"] == 4100
        await container.catalog.archive(priced.id)
        assert _ids(await client.get(PAGE)) == []
        assert _ids(await client.get("/v1/products?category=music")) == [str(moved.id)]


async def test_a_page_loaded_while_a_change_commits_is_never_served_after_it(container: Container) -> None:
    """The delete-then-load race: a page read from the database before a change, stored after the
    change's invalidation, must not be what the next reader gets."""
    products = container.product_cache
    assert products is not None
    book = await _book(container, "RACE-1", 700)
    loading, release = asyncio.Event(), asyncio.Event()

    async def slow_old_load() -> bytes:
        loading.set()
        await release.wait()
        return b'{"items":[],"next_cursor":null,"old":true}'

    racing = asyncio.create_task(products.page("books", "-created_at", 20, slow_old_load))
    await loading.wait()
    await container.catalog.update(book.id, ProductChanges(name="Renamed"))
    release.set()
    assert (await racing).body.endswith(b'"old":true}')  # the racing reader itself gets what it read

    async def fresh_load() -> bytes:
        return b'{"items":[],"next_cursor":null,"fresh":true}'

    assert (await products.page("books", "-created_at", 20, fresh_load)).body.endswith(b'"fresh":true}')


async def test_purging_a_category_tag_drops_its_cached_pages(container: Container) -> None:
    products = container.product_cache
    assert products is not None
    await _book(container, "PURGE-1", 800)
    app = shop_app(container)
    async with client_for(app) as client:
        await client.get(PAGE)
        with counting(container) as cached:
            await client.get(PAGE)
        assert cached.statements == []
        assert await products.purge(keys=[], tags=["category:books"]) == 1
        with counting(container) as purged:
            again = await client.get(PAGE)
        assert again.status_code == 200
        assert purged.statements, "a purged page is read again from the database"
