"""Orders on real databases: placing from the cart, visibility, keyset pages, and the routes.

Orders are placed the only way there is, checkout, which starts the saga in the same transaction.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.shop.cart.model import CartChanged
from mercato.shop.catalog.model import ProductChanges
from mercato.shop.orders.model import EmptyCart, Order, OrderNotFound, OrderStatus, UnavailableItems
from tests.integration.shop_support import admin, api, api_key, customer, product, service_account


async def place(container: Container, customer_id: uuid.UUID) -> Order:
    """Check the cart out (the order and its saga, one commit) and read the order back."""
    snapshot = await container.checkout.start(customer_id, correlation_id=str(uuid.uuid4()))
    return await container.orders.get(snapshot.id, customer_id=customer_id, read_all=False)


async def test_place_copies_prices_and_empties_the_cart(container: Container) -> None:
    book = await product(container, "ORD-1", 1999, name="A Book")
    await product(container, "ORD-2", 250)
    me = uuid.uuid4()
    await container.cart.set_item(me, "ORD-1", 2)
    await container.cart.set_item(me, "ORD-2", 3)

    order = await place(container, me)

    assert order.status is OrderStatus.PENDING
    assert (order.total_minor, order.item_count, order.currency) == (4748, 5, "EUR")
    assert [(line.line_no, line.sku, line.name, line.line_total_minor) for line in order.lines] == [
        (1, "ORD-1", "A Book", 3998),
        (2, "ORD-2", "Product ORD-2", 750),
    ]
    assert (await container.cart.view(me)).lines == ()
    await container.catalog.update(book.id, ProductChanges(price_minor=1, name="Renamed"))
    stored = await container.orders.get(order.id, customer_id=me, read_all=False)
    assert stored == order


async def test_empty_or_unorderable_carts_are_refused(container: Container) -> None:
    me = uuid.uuid4()
    with pytest.raises(EmptyCart):
        await place(container, me)
    gone = await product(container, "GONE-1", 100)
    await container.cart.set_item(me, "GONE-1", 1)
    await container.catalog.archive(gone.id)
    with pytest.raises(UnavailableItems):
        await place(container, me)
    assert len((await container.cart.view(me)).lines) == 1


async def test_a_double_submit_makes_one_order(container: Container) -> None:
    await product(container, "TWICE-1", 100)
    me = uuid.uuid4()
    await container.cart.set_item(me, "TWICE-1", 1)
    outcomes = await asyncio.gather(place(container, me), place(container, me), return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(errors) == 1
    assert isinstance(errors[0], (CartChanged, EmptyCart))
    orders, more = await container.orders.list_for_customer(me, limit=10)
    assert len(orders) == 1
    assert not more


async def test_other_customers_orders_are_not_found(container: Container) -> None:
    await product(container, "MINE-1", 100)
    me, other = uuid.uuid4(), uuid.uuid4()
    await container.cart.set_item(me, "MINE-1", 1)
    order = await place(container, me)
    with pytest.raises(OrderNotFound):
        await container.orders.get(order.id, customer_id=other, read_all=False)
    assert (await container.orders.get(order.id, customer_id=None, read_all=True)).id == order.id


async def _place_orders(
    container: Container, customer_id: uuid.UUID, count: int, clock: ManualClock
) -> list[str]:
    ids = []
    for _ in range(count):
        await container.cart.set_item(customer_id, "MANY-1", 1)
        ids.append(str((await place(container, customer_id)).id))
        clock.advance(1)
    return ids


async def test_order_routes(container: Container, clock: ManualClock) -> None:
    await product(container, "MANY-1", 500)
    _, my_headers = await customer(container)
    _, other_headers = await customer(container)
    async with api(container) as client:
        anonymous = await client.get("/v1/orders")
        assert anonymous.status_code == 401
        assert anonymous.headers["cache-control"] == "private, no-store"

        await client.put("/v1/carts/me/items/MANY-1", json={"quantity": 3}, headers=my_headers)
        placed = await client.post("/v1/checkout", headers={**my_headers, "Idempotency-Key": "k-1"})
        assert placed.status_code == 202
        location = placed.headers["location"]
        assert location == f"/v1/orders/{placed.json()['order_id']}"
        assert (await client.get("/v1/carts/me", headers=my_headers)).json()["lines"] == []

        created = await client.get(location, headers=my_headers)
        assert created.headers["cache-control"] == "private, no-store"
        order = created.json()
        assert (order["status"], order["total_minor"], order["item_count"]) == ("pending", 1500, 3)
        assert order["created_at"].endswith("Z")
        assert order["checkout"]["saga_status"] in {"running", "compensating", "completed", "failed"}

        mine = await client.get(location, headers=my_headers)
        assert mine.status_code == 200
        assert mine.json() == order
        theirs = await client.get(location, headers=other_headers)
        assert theirs.status_code == 404
        assert theirs.json()["type"] == "/problems/order-not-found"
        assert "customer_id" not in theirs.text
        assert (await client.get("/v1/orders/not-an-id", headers=my_headers)).status_code == 404
        for operator in (await admin(container), await service_account(container)):
            seen = await client.get(location, headers=operator)
            assert seen.status_code == 200
            assert seen.json()["id"] == order["id"]
        assert (await client.get("/admin/orders", headers=my_headers)).status_code == 403


async def test_order_pages_cover_every_order_exactly_once(container: Container, clock: ManualClock) -> None:
    await product(container, "MANY-1", 500)
    me, my_headers = await customer(container)
    other, _ = await customer(container)
    my_ids = await _place_orders(container, me, 23, clock)
    other_ids = await _place_orders(container, other, 4, clock)
    async with api(container) as client:
        assert (await client.get("/v1/orders", params={"limit": 101}, headers=my_headers)).status_code == 400
        assert (await client.get("/v1/orders", params={"limit": 0}, headers=my_headers)).status_code == 400
        bad = await client.get("/v1/orders", params={"cursor": "garbage!"}, headers=my_headers)
        assert bad.status_code == 400
        assert bad.json()["errors"][0]["field"] == "query.cursor"

        async def walk(path: str, headers: dict[str, str], limit: int) -> list[str]:
            seen: list[str] = []
            cursor = None
            while True:
                params: dict[str, str | int] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
                page = await client.get(path, params=params, headers=headers)
                assert page.status_code == 200
                assert page.headers["cache-control"] == "private, no-store"
                body = page.json()
                assert len(body["items"]) <= limit
                seen.extend(item["id"] for item in body["items"])
                cursor = body["next_cursor"]
                if cursor is None:
                    return seen

        mine = await walk("/v1/orders", my_headers, 5)
        assert mine == list(reversed(my_ids))
        everything = await walk("/admin/orders", await admin(container), 7)
        assert sorted(everything) == sorted(my_ids + other_ids)
        assert len(everything) == len(set(everything))
        assert everything == sorted(everything, reverse=True)


async def test_orders_need_a_customer_subject_for_own_lists(container: Container) -> None:
    headers = await api_key(container, frozenset({"orders:read"}))
    async with api(container) as client:
        response = await client.get("/v1/orders", headers=headers)
        assert response.status_code == 403
        assert response.json()["type"] == "/problems/orders-customer-required"
