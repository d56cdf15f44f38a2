"""The simulated carrier in-process (ASGI), on SQLite and PostgreSQL: idempotency, cancel, listing, faults."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from mercato.kit.clock import ManualClock
from mercato.providers import CarrierClient, FaultSettings, ProviderApp, ProviderError, ResponseLost
from mercato.providers.carrier import Address, ShipmentItem, create_carrier_app
from mercato.providers.carrier.service import carrier_metadata

if TYPE_CHECKING:
    from tests.integration.provider_support import InProcess, Served

pytest_plugins = ["tests.integration.provider_support"]


@pytest.fixture
def carrier_app(provider_db_url: str) -> ProviderApp:
    return create_carrier_app(provider_db_url, clock=ManualClock(), rng=random.Random(2))


@pytest.fixture
async def carrier(carrier_app: ProviderApp, in_process: InProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with in_process(carrier_app, carrier_metadata) as client:
        yield client


def _order() -> str:
    return f"ord-{uuid.uuid4().hex[:8]}"


def _shipment(order: str, **extra: Any) -> dict[str, Any]:
    return {"order_reference": order, "items": [{"sku": "SKU-1", "quantity": 2}], **extra}


async def _post(
    client: httpx.AsyncClient, path: str, body: dict[str, Any] | None = None, key: str | None = None
):
    return await client.post(path, json=body or {}, headers={"Idempotency-Key": key or uuid.uuid4().hex})


async def _summary(client: httpx.AsyncClient, order: str) -> dict[str, Any]:
    orders = (await client.get("/v1/shipments/summary", params={"order_reference": order})).json()["orders"]
    return dict(orders[0]) if orders else {}


async def test_create_is_idempotent_and_cancel_is_guarded(carrier: httpx.AsyncClient) -> None:
    order, key = _order(), uuid.uuid4().hex
    address = {
        "name": "A. Buyer",
        "line1": "1 Main St",
        "city": "Lyon",
        "postal_code": "69001",
        "country": "FR",
    }
    created = await _post(carrier, "/v1/shipments", _shipment(order, address=address), key)
    assert created.status_code == 201
    shipment = created.json()
    assert (shipment["status"], shipment["address"]["city"]) == ("created", "Lyon")
    assert shipment["tracking_number"].startswith("MC")
    replay = await _post(carrier, "/v1/shipments", _shipment(order, address=address), key)
    assert (replay.json(), replay.headers["idempotent-replayed"]) == (shipment, "true")
    mismatch = await _post(carrier, "/v1/shipments", _shipment(order), key)
    assert (mismatch.status_code, mismatch.json()["type"]) == (422, "/problems/idempotency-key-reused")
    shipment_id = shipment["shipment_id"]
    cancelled = await _post(carrier, f"/v1/shipments/{shipment_id}/cancel")
    assert (cancelled.status_code, cancelled.json()["status"]) == (200, "cancelled")
    twice = await _post(carrier, f"/v1/shipments/{shipment_id}/cancel")
    assert (twice.status_code, twice.json()["type"]) == (409, "/problems/already-cancelled")
    assert (await _post(carrier, f"/v1/shipments/{uuid.uuid4()}/cancel")).status_code == 404
    assert await _summary(carrier, order) == {
        "order_reference": order,
        "created": 1,
        "cancelled": 1,
        "active": 0,
    }


async def test_listing_filters_by_order_and_paginates(carrier: httpx.AsyncClient) -> None:
    order, other = _order(), _order()
    for ref in (order, order, order, other):
        assert (await _post(carrier, "/v1/shipments", _shipment(ref))).status_code == 201
    page = (await carrier.get("/v1/shipments", params={"order_reference": order, "limit": 2})).json()
    assert len(page["items"]) == 2
    rest = (
        await carrier.get("/v1/shipments", params={"order_reference": order, "cursor": page["next_cursor"]})
    ).json()
    assert (len(rest["items"]), rest["next_cursor"]) == (1, None)
    ids = [s["shipment_id"] for s in page["items"] + rest["items"]]
    assert ids == sorted(ids)
    one = (await carrier.get(f"/v1/shipments/{ids[0]}")).json()
    assert one["order_reference"] == order
    assert (await carrier.get(f"/v1/shipments/{uuid.uuid4()}")).status_code == 404
    assert (await _summary(carrier, other))["active"] == 1


async def test_missing_key_and_invalid_items_are_rejected(carrier: httpx.AsyncClient) -> None:
    missing = await carrier.post("/v1/shipments", json=_shipment("o"))
    assert (missing.status_code, missing.json()["type"]) == (400, "/problems/idempotency-key-missing")
    empty = await _post(carrier, "/v1/shipments", {"order_reference": "o", "items": []})
    assert (empty.status_code, empty.json()["errors"][0]["field"]) == (422, "body.items")


async def test_lost_response_creates_the_shipment_and_the_retry_replays(
    carrier: httpx.AsyncClient, carrier_app: ProviderApp
) -> None:
    order, key = _order(), uuid.uuid4().hex
    carrier_app.injector.update(FaultSettings(lost_response_rate=1.0))
    with pytest.raises(ResponseLost):
        await _post(carrier, "/v1/shipments", _shipment(order), key)
    assert (await _summary(carrier, order))["created"] == 1
    carrier_app.injector.update(FaultSettings())
    retry = await _post(carrier, "/v1/shipments", _shipment(order), key)
    assert (retry.status_code, retry.headers["idempotent-replayed"]) == (201, "true")
    assert (await _summary(carrier, order))["created"] == 1


async def test_faults_hit_business_calls_only(carrier: httpx.AsyncClient, carrier_app: ProviderApp) -> None:
    order = _order()
    carrier_app.injector.update(FaultSettings(error_rate=1.0))
    assert (await _post(carrier, "/v1/shipments", _shipment(order))).status_code in (500, 503)
    assert (await carrier.get("/v1/shipments", params={"order_reference": order})).json()["items"] == []
    carrier_app.injector.update(FaultSettings(hang_rate=1.0))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(_post(carrier, "/v1/shipments", _shipment(order)), 0.3)
    assert (await carrier.get("/healthz")).status_code == 200
    assert (await carrier.put("/admin/faults", json={"outage_for_s": 5})).json()["outage_active"] is True
    assert (await _post(carrier, "/v1/shipments", _shipment(order))).status_code == 503
    assert await _summary(carrier, order) == {}
    metrics = (await carrier.get("/metrics")).text
    for fault in ("error", "hang", "outage"):
        assert f'fault="{fault}",method="POST",provider="carrier",route="/v1/shipments"}} 1.0' in metrics


async def test_client_round_trip(carrier_app: ProviderApp, on_a_port: Served) -> None:
    async with on_a_port(carrier_app, carrier_metadata) as base_url:
        client = CarrierClient(base_url)
        try:
            order = _order()
            shipment = await client.create_shipment(
                order_reference=order,
                items=[ShipmentItem(sku="A", quantity=1)],
                address=Address(name="N", line1="L", city="C", postal_code="P", country="DE"),
                idempotency_key="s1",
            )
            await client.cancel_shipment(shipment.shipment_id, idempotency_key="x1")
            with pytest.raises(ProviderError) as conflict:
                await client.cancel_shipment(shipment.shipment_id, idempotency_key="x2")
            assert conflict.value.slug == "already-cancelled"
            assert (await client.get_shipment(shipment.shipment_id)).status.value == "cancelled"
            assert (await client.summary(order_reference=order)).totals.cancelled == 1
            assert len((await client.shipments(order_reference=order)).items) == 1
        finally:
            await client.aclose()
