"""No dead ends: every order a customer can create has a saga that will move it to an outcome.

`POST /v1/orders` used to create a `pending` order that no saga moved and no event reported. It is
gone; checkout is the way to order. The sweep below does not trust a list of routes: it calls every
state-changing operation the OpenAPI document offers, as a customer with a full cart, and then checks
that each order in the database has its saga.
"""

from __future__ import annotations

import re
import uuid

from sqlalchemy import select

from mercato.bootstrap import Container
from mercato.kit.sagas.store import SagaStatus, saga_instances
from mercato.shop.orders.tables import orders
from tests.integration.shop_support import CUSTOMER_SCOPES, account, api, bearer, customer, product


async def test_post_v1_orders_is_gone_and_checkout_is_the_way_to_order(container: Container) -> None:
    await product(container, "DEAD-1", 500)
    _, me = await customer(container)
    async with api(container) as client:
        await client.put("/v1/carts/me/items/DEAD-1", json={"quantity": 1}, headers=me)
        gone = await client.post("/v1/orders", headers={**me, "Idempotency-Key": "dead-1"})
        assert gone.status_code == 405
        assert gone.headers["content-type"].startswith("application/problem+json")
        assert gone.json()["type"] == "/problems/method-not-allowed"
        assert "POST" not in gone.headers["allow"]
        assert "GET" in gone.headers["allow"]
        # Nothing was taken from the cart, no order exists.
        assert len((await client.get("/v1/carts/me", headers=me)).json()["lines"]) == 1
        assert (await client.get("/v1/orders", headers=me)).json()["items"] == []
        spec = (await client.get("/openapi.json")).json()
        for path, operations in spec["paths"].items():
            if re.match(r"^/v\d+/orders", path):
                assert "post" not in operations, path


def _fill(path: str, sku: str) -> str:
    """A concrete URL for a templated path: the cart's SKU for `{sku}`, a fresh id otherwise."""
    return re.sub(r"\{(\w+)\}", lambda m: sku if m.group(1) == "sku" else str(uuid.uuid4()), path)


async def test_every_order_a_customer_can_create_is_moved_by_a_saga(container: Container) -> None:
    sku = "SWEEP-1"
    await product(container, sku, 700)
    await container.inventory.set_available(sku, 1000)
    me = await account(container, role="customer")
    async with api(container) as client:
        spec = (await client.get("/openapi.json")).json()
        calls: list[tuple[str, str]] = [
            (method.upper(), path)
            for path, operations in spec["paths"].items()
            for method in operations
            if method in {"post", "put", "patch"}
        ]
        assert ("POST", "/v1/checkout") in calls
        statuses: dict[tuple[str, str], int] = {}
        for method, path in calls:
            # A fresh token for the same customer each time (a logout on the way must not blind
            # the rest of the sweep), and a full cart for whichever operation might order it.
            headers = await _same_customer(container, me)
            await client.put(f"/v1/carts/me/items/{sku}", json={"quantity": 1}, headers=headers)
            response = await client.request(
                method,
                _fill(path, sku),
                json={},
                headers={**headers, "Idempotency-Key": f"sweep-{uuid.uuid4()}"},
            )
            assert response.status_code < 500, (method, path, response.text)
            statuses[(method, path)] = response.status_code
    assert statuses[("POST", "/v1/checkout")] == 202

    async with container.db.read() as conn:
        order_ids = {row.id for row in await conn.execute(select(orders.c.id))}
        sagas = {
            row.id: row.status
            for row in await conn.execute(select(saga_instances.c.id, saga_instances.c.status))
        }
    assert order_ids, "the sweep placed no order at all"
    without_saga = order_ids - sagas.keys()
    assert not without_saga, f"orders no saga will ever move: {without_saga}"
    assert all(SagaStatus(sagas[order_id]) is SagaStatus.RUNNING for order_id in order_ids)


async def _same_customer(container: Container, customer_id: uuid.UUID) -> dict[str, str]:
    return await bearer(container, subject=str(customer_id), roles={"customer"}, scopes=CUSTOMER_SCOPES)
