"""ETags and conditional requests on both engines: 304s, 428, 412 and no lost update."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from mercato.bootstrap import Container
from mercato.shop.catalog.model import ProductChanges
from mercato.shop.catalog.service import StaleProduct
from tests.integration.shop_support import admin, api, customer, product


def assert_problem(response: httpx.Response, status: int, type_: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == type_


async def test_product_etags_answer_304_and_change_with_every_write(container: Container) -> None:
    item = await product(container, "TAG-1", 1999)
    async with api(container) as client:
        first = await client.get(f"/v1/products/{item.id}")
        etag = first.headers["etag"]
        assert etag == f'"product.{item.id}.r1.v1"'

        cached = await client.get(f"/v1/products/{item.id}", headers={"If-None-Match": etag})
        assert cached.status_code == 304
        assert cached.content == b""
        assert cached.headers["etag"] == etag
        # If-None-Match compares weakly and accepts lists and `*`.
        for header in (f"W/{etag}", f'"other", {etag}', "*"):
            again = await client.get(f"/v1/products/{item.id}", headers={"If-None-Match": header})
            assert again.status_code == 304, header

        # Each representation has its own tag: a v1 tag never revalidates a v2 body.
        v2 = await client.get(f"/v2/products/{item.id}", headers={"If-None-Match": etag})
        assert v2.status_code == 200
        assert v2.headers["etag"] == f'"product.{item.id}.r1.v2"'

        await container.catalog.update(item.id, ProductChanges(name="Renamed"))
        changed = await client.get(f"/v1/products/{item.id}", headers={"If-None-Match": etag})
        assert changed.status_code == 200
        assert changed.json()["name"] == "Renamed"
        assert changed.headers["etag"] == f'"product.{item.id}.r2.v1"'


async def test_patch_needs_if_match_and_refuses_a_stale_one(container: Container) -> None:
    item = await product(container, "TAG-2", 500)
    headers = await admin(container)
    async with api(container) as client:
        url = f"/v1/products/{item.id}"
        missing = await client.patch(url, json={"name": "No precondition"}, headers=headers)
        assert_problem(missing, 428, "/problems/precondition-required")

        current = (await client.get(url)).headers["etag"]
        ok = await client.patch(url, json={"name": "First"}, headers={**headers, "If-Match": current})
        assert ok.status_code == 200, ok.text
        assert ok.headers["etag"] == f'"product.{item.id}.r2.v1"'

        stale = await client.patch(url, json={"name": "Second"}, headers={**headers, "If-Match": current})
        assert_problem(stale, 412, "/problems/precondition-failed")
        # Weak tags never match a write (strong comparison), nor do tags of another product.
        for tag in (f"W/{ok.headers['etag']}", f'"product.{uuid.uuid4()}.r2.v1"', "garbage"):
            refused = await client.patch(url, json={"name": "Third"}, headers={**headers, "If-Match": tag})
            assert_problem(refused, 412, "/problems/precondition-failed")
        assert (await container.catalog.get(item.id)).name == "First"

        # A v2 reader's tag names the same stored version, so it is good for the v1 write.
        v2_tag = (await client.get(f"/v2/products/{item.id}")).headers["etag"]
        via_v2 = await client.patch(url, json={"name": "From v2"}, headers={**headers, "If-Match": v2_tag})
        assert via_v2.status_code == 200
        # `*` is "any current version" (RFC 9110): an explicit opt-out of the lost-update check.
        star = await client.patch(url, json={"description": "any"}, headers={**headers, "If-Match": "*"})
        assert star.status_code == 200
        assert star.json()["version"] == 4

        unknown = await client.patch(
            f"/v1/products/{uuid.uuid4()}", json={"name": "x"}, headers={**headers, "If-Match": current}
        )
        assert_problem(unknown, 404, "/problems/product-not-found")


async def test_two_admins_editing_one_product_lose_no_update(container: Container) -> None:
    item = await product(container, "TAG-3", 1000, name="Original")
    alice, bob = await admin(container), await admin(container)
    async with api(container) as client:
        url = f"/v1/products/{item.id}"
        alice_tag = (await client.get(url, headers=alice)).headers["etag"]
        bob_tag = (await client.get(url, headers=bob)).headers["etag"]
        assert alice_tag == bob_tag

        renamed = await client.patch(
            url, json={"name": "Alice's name"}, headers={**alice, "If-Match": alice_tag}
        )
        assert renamed.status_code == 200
        # Bob edits what he saw, which is no longer what is stored: refused, nothing written.
        repriced = await client.patch(url, json={"price_minor": 1500}, headers={**bob, "If-Match": bob_tag})
        assert_problem(repriced, 412, "/problems/precondition-failed")
        assert (await client.get(url)).json()["price_minor"] == 1000

        # Bob reloads, sees Alice's change, and reapplies his on top of it.
        fresh = await client.get(url, headers=bob)
        assert fresh.json()["name"] == "Alice's name"
        retried = await client.patch(
            url, json={"price_minor": 1500}, headers={**bob, "If-Match": fresh.headers["etag"]}
        )
        assert retried.status_code == 200
        final = (await client.get(url)).json()
        assert (final["name"], final["price_minor"], final["version"]) == ("Alice's name", 1500, 3)


async def test_concurrent_patches_with_one_if_match_let_exactly_one_win(container: Container) -> None:
    item = await product(container, "TAG-4", 100)
    headers = await admin(container)
    async with api(container) as client:
        url = f"/v1/products/{item.id}"
        tag = (await client.get(url)).headers["etag"]
        responses = await asyncio.gather(
            *(
                client.patch(url, json={"price_minor": 200 + n}, headers={**headers, "If-Match": tag})
                for n in range(2)
            )
        )
    assert sorted(r.status_code for r in responses) == [200, 412]
    winner = next(r for r in responses if r.status_code == 200).json()
    stored = await container.catalog.get(item.id)
    assert (stored.price_minor, stored.version) == (winner["price_minor"], 2)


async def test_many_writers_holding_one_version_produce_one_write(container: Container) -> None:
    # The version check is the UPDATE's WHERE clause: racing writers cannot all pass a check
    # made earlier; on PostgreSQL the losers wait on the row lock and then match no row.
    item = await product(container, "TAG-5", 100)
    outcomes = await asyncio.gather(
        *(
            container.catalog.update(item.id, ProductChanges(price_minor=1000 + n), expected_versions={1})
            for n in range(8)
        ),
        return_exceptions=True,
    )
    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(o, StaleProduct) for o in outcomes if isinstance(o, BaseException))
    stored = await container.catalog.get(item.id)
    assert (stored.version, stored.price_minor) == (2, winners[0].price_minor)
    with pytest.raises(StaleProduct):
        await container.catalog.update(item.id, ProductChanges(name="late"), expected_versions={1})


async def test_cart_etag_follows_its_lines_and_its_prices(container: Container) -> None:
    item = await product(container, "TAG-CART", 300)
    _, me = await customer(container)
    async with api(container) as client:
        empty = await client.get("/v1/carts/me", headers=me)
        tag = empty.headers["etag"]
        cached = await client.get("/v1/carts/me", headers={**me, "If-None-Match": tag})
        assert cached.status_code == 304
        assert cached.headers["cache-control"] == "private, no-store"

        put = await client.put("/v1/carts/me/items/TAG-CART", json={"quantity": 2}, headers=me)
        assert put.headers["etag"] != tag
        after_put = await client.get("/v1/carts/me", headers={**me, "If-None-Match": tag})
        assert after_put.status_code == 200
        assert after_put.headers["etag"] == put.headers["etag"]

        # The cart is priced from the catalog now, so a price change is a new representation.
        await container.catalog.update(item.id, ProductChanges(price_minor=350))
        repriced = await client.get("/v1/carts/me", headers={**me, "If-None-Match": put.headers["etag"]})
        assert repriced.status_code == 200
        assert repriced.json()["total_minor"] == 700


async def test_order_etags_revalidate_each_representation(container: Container) -> None:
    await product(container, "TAG-ORD", 250)
    _, me = await customer(container)
    async with api(container) as client:
        await client.put("/v1/carts/me/items/TAG-ORD", json={"quantity": 1}, headers=me)
        placed = await client.post("/v1/checkout", headers={**me, "Idempotency-Key": "tag-ord"})
        order_id = placed.json()["order_id"]
        for version in ("v1", "v2"):
            url = f"/{version}/orders/{order_id}"
            first = await client.get(url, headers=me)
            assert first.status_code == 200
            cached = await client.get(url, headers={**me, "If-None-Match": first.headers["etag"]})
            assert cached.status_code == 304
            assert cached.content == b""
            assert cached.headers["cache-control"] == "private, no-store"
        v1_tag = (await client.get(f"/v1/orders/{order_id}", headers=me)).headers["etag"]
        v2 = await client.get(f"/v2/orders/{order_id}", headers={**me, "If-None-Match": v1_tag})
        assert v2.status_code == 200
        # Another customer learns nothing, not even by guessing the tag.
        _, other = await customer(container)
        hidden = await client.get(f"/v1/orders/{order_id}", headers={**other, "If-None-Match": v1_tag})
        assert_problem(hidden, 404, "/problems/order-not-found")
