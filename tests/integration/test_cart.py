"""Cart on real databases: prices from the catalog at read time, limits, and the HTTP routes."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from mercato.bootstrap import Container
from mercato.shop.cart.contracts import UnavailableReason
from mercato.shop.cart.model import (
    CartChanged,
    CartFull,
    CartLimits,
    CurrencyMismatch,
    InvalidCartItem,
    ProductUnavailable,
)
from mercato.shop.cart.service import CartService
from mercato.shop.catalog.model import ProductChanges
from tests.integration.shop_support import api, api_key, customer, product


async def test_cart_is_priced_from_the_catalog_at_read_time(container: Container) -> None:
    book = await product(container, "BOOK-1", 1250)
    pen = await product(container, "PEN-1", 199)
    me = uuid.uuid4()
    cart = container.cart
    assert (await cart.view(me)).lines == ()

    await cart.set_item(me, "BOOK-1", 2)
    await cart.set_item(me, "PEN-1", 1)
    view = await cart.set_item(me, "PEN-1", 3)
    assert [(line.sku, line.quantity, line.line_total_minor) for line in view.lines] == [
        ("BOOK-1", 2, 2500),
        ("PEN-1", 3, 597),
    ]
    assert (view.total_minor, view.currency, view.item_count) == (3097, "EUR", 5)

    await container.catalog.update(book.id, ProductChanges(price_minor=1000))
    await container.catalog.archive(pen.id)
    view = await cart.view(me)
    assert view.lines[0].unit_price_minor == 1000
    assert view.lines[1].unavailable_reason is UnavailableReason.ARCHIVED
    assert (view.total_minor, view.item_count) == (2000, 2)
    # Another customer's cart is separate.
    assert (await cart.view(uuid.uuid4())).lines == ()


async def test_cart_rules(container: Container) -> None:
    await product(container, "EUR-1", 100)
    await product(container, "EUR-2", 100)
    await product(container, "EUR-3", 100)
    await product(container, "USD-1", 100, currency="USD")
    archived = await product(container, "OLD-1", 100)
    await container.catalog.archive(archived.id)
    small = CartService(container.db, container.clock, container.catalog, CartLimits(5, 2))
    me = uuid.uuid4()

    with pytest.raises(ProductUnavailable):
        await small.set_item(me, "NOPE-1", 1)
    with pytest.raises(ProductUnavailable):
        await small.set_item(me, "OLD-1", 1)
    with pytest.raises(InvalidCartItem):
        await small.set_item(me, "EUR-1", 6)
    with pytest.raises(InvalidCartItem):
        await small.set_item(me, "EUR-1", 0)
    await small.set_item(me, "EUR-1", 5)
    with pytest.raises(CurrencyMismatch):
        await small.set_item(me, "USD-1", 1)
    await small.set_item(me, "EUR-2", 1)
    with pytest.raises(CartFull):
        await small.set_item(me, "EUR-3", 1)
    # Changing an existing line is not adding one.
    assert (await small.set_item(me, "EUR-2", 4)).item_count == 9
    await small.remove_item(me, "EUR-1")
    await small.remove_item(me, "EUR-1")
    assert [line.sku for line in (await small.view(me)).lines] == ["EUR-2"]
    await small.clear(me)
    assert (await small.view(me)).lines == ()


async def test_take_is_all_or_nothing(container: Container) -> None:
    await product(container, "TAKE-1", 100)
    await product(container, "TAKE-2", 100)
    me = uuid.uuid4()
    await container.cart.set_item(me, "TAKE-1", 1)
    await container.cart.set_item(me, "TAKE-2", 2)
    with pytest.raises(CartChanged):
        await container.cart.take(me, [("TAKE-1", 1), ("TAKE-2", 3)])
    assert len((await container.cart.view(me)).lines) == 2
    await container.cart.take(me, [("TAKE-1", 1), ("TAKE-2", 2)])
    assert (await container.cart.view(me)).lines == ()


async def test_take_names_the_first_line_that_changed(container: Container) -> None:
    await product(container, "NAME-1", 100)
    await product(container, "NAME-2", 100)
    me = uuid.uuid4()
    await container.cart.set_item(me, "NAME-1", 1)
    await container.cart.set_item(me, "NAME-2", 2)
    with pytest.raises(CartChanged) as changed:
        await container.cart.take(me, [("NAME-2", 2), ("NAME-1", 5), ("GONE-9", 1)])
    assert changed.value.extensions == {"sku": "GONE-9"}
    assert len((await container.cart.view(me)).lines) == 2


async def test_concurrent_first_adds_of_one_sku_leave_one_line(container: Container) -> None:
    await product(container, "RACE-1", 100)
    me = uuid.uuid4()
    views = await asyncio.gather(*(container.cart.set_item(me, "RACE-1", n) for n in range(1, 6)))
    assert all(len(view.lines) == 1 for view in views)
    [line] = (await container.cart.view(me)).lines
    assert line.sku == "RACE-1"
    assert line.quantity in range(1, 6)


async def test_a_line_keeps_its_place_when_its_quantity_changes(container: Container) -> None:
    await product(container, "KEEP-1", 100)
    await product(container, "KEEP-2", 100)
    me = uuid.uuid4()
    await container.cart.set_item(me, "KEEP-1", 1)
    container.clock.advance(60)
    await container.cart.set_item(me, "KEEP-2", 1)
    container.clock.advance(60)
    answered = await container.cart.set_item(me, "KEEP-1", 4)
    assert [(line.sku, line.quantity) for line in answered.lines] == [("KEEP-1", 4), ("KEEP-2", 1)]
    assert await container.cart.view(me) == answered


async def test_cart_routes(container: Container) -> None:
    await product(container, "API-1", 450)
    archived = await product(container, "API-2", 300)
    await product(container, "API-USD", 300, currency="USD")
    _, headers = await customer(container)
    async with api(container) as client:
        anonymous = await client.get("/v1/carts/me")
        assert anonymous.status_code == 401
        assert anonymous.headers["cache-control"] == "private, no-store"
        _, reader_only = await customer(container, frozenset({"cart:read"}))
        forbidden = await client.put("/v1/carts/me/items/API-1", json={"quantity": 1}, headers=reader_only)
        assert forbidden.status_code == 403

        empty = await client.get("/v1/carts/me", headers=headers)
        assert empty.status_code == 200
        assert empty.headers["cache-control"] == "private, no-store"
        assert empty.json() == {"lines": [], "currency": None, "total_minor": 0, "item_count": 0}

        put = await client.put("/v1/carts/me/items/API-1", json={"quantity": 2}, headers=headers)
        assert put.status_code == 200
        assert put.headers["cache-control"] == "private, no-store"
        assert put.json()["total_minor"] == 900
        assert put.json()["lines"][0]["line_total_minor"] == 900
        await client.put("/v1/carts/me/items/API-2", json={"quantity": 1}, headers=headers)
        await container.catalog.archive(archived.id)
        cart = (await client.get("/v1/carts/me", headers=headers)).json()
        assert [(line["sku"], line["available"]) for line in cart["lines"]] == [
            ("API-1", True),
            ("API-2", False),
        ]
        assert cart["lines"][1]["unavailable_reason"] == "archived"
        assert cart["total_minor"] == 900

        # ADR 0028: outside the schema (the configured 1-99 included) is 400; a rule or state is 422.
        for sku, body, status, slug in [
            ("NOPE-1", {"quantity": 1}, 422, "product-unavailable"),
            ("API-USD", {"quantity": 1}, 422, "cart-currency-mismatch"),
            ("API-1", {"quantity": 100}, 400, "validation-error"),
            ("API-1", {"quantity": 0}, 400, "validation-error"),
            ("API-1", {"quantity": 1, "extra": True}, 400, "validation-error"),
        ]:
            bad = await client.put(f"/v1/carts/me/items/{sku}", json=body, headers=headers)
            assert bad.status_code == status, (sku, body)
            assert bad.json()["type"] == f"/problems/{slug}"
            assert bad.headers["cache-control"] == "private, no-store"

        removed = await client.delete("/v1/carts/me/items/API-2", headers=headers)
        assert removed.status_code == 204
        assert removed.headers["cache-control"] == "private, no-store"
        assert len((await client.get("/v1/carts/me", headers=headers)).json()["lines"]) == 1
        assert (await client.delete("/v1/carts/me", headers=headers)).status_code == 204
        assert (await client.get("/v1/carts/me", headers=headers)).json()["lines"] == []

        scopes = frozenset({"cart:read", "cart:write"})
        not_customer = await api_key(container, scopes)
        assert (await client.get("/v1/carts/me", headers=not_customer)).status_code == 403
