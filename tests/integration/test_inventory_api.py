"""Inventory routes through the real app: scopes, problems, reservations over HTTP."""

from __future__ import annotations

from mercato.bootstrap import Container
from tests.integration.shop_support import admin, api, customer, service_account


async def test_stock_routes_need_inventory_scopes(container: Container) -> None:
    _, shopper = await customer(container)
    async with api(container) as client:
        missing = await client.get("/v1/inventory/SKU-1")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.headers["content-type"] == "application/problem+json"
        assert (await client.get("/v1/inventory/SKU-1", headers=shopper)).status_code == 403
        put = await client.put("/v1/inventory/SKU-1", json={"available": 3}, headers=shopper)
        assert put.status_code == 403
        assert put.json()["type"] == "/problems/forbidden"


async def test_put_sets_and_adjusts_stock(container: Container) -> None:
    headers = await admin(container)
    async with api(container) as client:
        assert (await client.get("/v1/inventory/SKU-1", headers=headers)).status_code == 404
        set_ = await client.put("/v1/inventory/SKU-1", json={"available": 10}, headers=headers)
        assert set_.status_code == 200
        assert set_.json()["available"] == 10
        assert set_.json()["updated_at"].endswith("Z")
        adjusted = await client.put("/v1/inventory/SKU-1", json={"delta": -4}, headers=headers)
        assert adjusted.json()["available"] == 6
        too_much = await client.put("/v1/inventory/SKU-1", json={"delta": -7}, headers=headers)
        assert too_much.status_code == 422
        assert too_much.json()["type"] == "/problems/invalid-stock-change"
        # Outside the schema: 400 (ADR 0028); a path that cannot hold a SKU names no resource: 404.
        both = await client.put("/v1/inventory/SKU-1", json={"available": 1, "delta": 1}, headers=headers)
        assert both.status_code == 400
        unbounded = await client.put("/v1/inventory/SKU-1", json={"available": 10**10}, headers=headers)
        assert unbounded.status_code == 400
        extra = await client.put("/v1/inventory/SKU-1", json={"available": 1, "x": 1}, headers=headers)
        assert extra.status_code == 400
        whole = await client.put("/v1/inventory/SKU-9", json={"available": 7.0}, headers=headers)
        assert (whole.status_code, whole.json()["available"]) == (200, 7)  # JSON Schema's integer
        fraction = await client.put("/v1/inventory/SKU-9", json={"available": 7.5}, headers=headers)
        assert fraction.status_code == 400
        assert (await client.get("/v1/inventory/not-a-sku", headers=headers)).status_code == 404
        shadowed = await client.get("/v1/inventory/reservations", headers=headers)
        assert (shadowed.status_code, shadowed.headers["allow"]) == (405, "POST, OPTIONS")
        got = await client.get("/v1/inventory/SKU-1", headers=headers)
        assert got.json() | {"updated_at": None} == {
            "sku": "SKU-1",
            "available": 6,
            "reserved": 0,
            "committed": 0,
            "version": 2,
            "updated_at": None,
        }


async def test_reservation_lifecycle_over_http(container: Container) -> None:
    await container.inventory.set_available("SKU-A", 5)
    await container.inventory.set_available("SKU-B", 1)
    headers = await service_account(container)
    body = {
        "reference": "order-1",
        "lines": [{"sku": "SKU-A", "quantity": 2}, {"sku": "SKU-B", "quantity": 1}],
    }
    async with api(container) as client:
        created = await client.post("/v1/inventory/reservations", json=body, headers=headers)
        assert created.status_code == 201
        reservation = created.json()
        assert created.headers["location"] == f"/v1/inventory/reservations/{reservation['id']}"
        assert reservation["status"] == "active"

        replay = await client.post("/v1/inventory/reservations", json=body, headers=headers)
        assert replay.status_code == 200
        assert replay.json()["id"] == reservation["id"]

        short = await client.post(
            "/v1/inventory/reservations",
            json={
                "reference": "order-2",
                "lines": [{"sku": "SKU-A", "quantity": 1}, {"sku": "SKU-B", "quantity": 1}],
            },
            headers=headers,
        )
        assert short.status_code == 409
        assert short.json()["type"] == "/problems/out-of-stock"
        assert short.json()["short_skus"] == ["SKU-B"]

        got = await client.get(created.headers["location"], headers=headers)
        assert got.json() == reservation
        committed = await client.post(f"{created.headers['location']}/commit", headers=headers)
        assert committed.status_code == 200
        assert committed.json()["status"] == "committed"
        refused = await client.post(f"{created.headers['location']}/release", headers=headers)
        assert refused.status_code == 409
        assert refused.json()["type"] == "/problems/reservation-not-active"
        unknown = await client.post("/v1/inventory/reservations/nope/release", headers=headers)
        assert unknown.status_code == 404
        empty = await client.post(
            "/v1/inventory/reservations", json={"reference": "o-3", "lines": []}, headers=headers
        )
        assert empty.status_code == 400

    level = await container.inventory.stock("SKU-A")
    assert (level.available, level.reserved, level.committed) == (3, 0, 2)
