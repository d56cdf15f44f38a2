"""HTTP semantics the OpenAPI promises: OPTIONS and a full Allow, 406, one 400/422 rule (ADR 0028)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from mercato.bootstrap import Container
from mercato.gateway.app import create_app
from tests.conftest import make_settings


@pytest.fixture
async def client(container: Container, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(database_url), container=container, configure_logs=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http


def _methods(allow: str) -> set[str]:
    return {method.strip() for method in allow.split(",")}


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/v1/products", {"GET", "HEAD", "POST", "OPTIONS"}),
        ("/v1/orders", {"GET", "HEAD", "OPTIONS"}),
        ("/v1/carts/me", {"GET", "HEAD", "DELETE", "OPTIONS"}),
        ("/v1/inventory/reservations", {"POST", "OPTIONS"}),
        ("/v1/inventory/SKU-1", {"GET", "HEAD", "PUT", "OPTIONS"}),
    ],
)
async def test_options_lists_every_method_of_the_path(
    client: httpx.AsyncClient, path: str, methods: set[str]
) -> None:
    """Starlette's own answer listed only the first route's methods (GET /v1/products without POST)."""
    response = await client.options(path)
    assert response.status_code == 204
    assert _methods(response.headers["allow"]) == methods


async def test_a_405_carries_the_full_allow(client: httpx.AsyncClient) -> None:
    response = await client.delete("/v1/products")
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
    assert _methods(response.headers["allow"]) == {"GET", "HEAD", "POST", "OPTIONS"}


async def test_a_replayed_405_keeps_its_allow(client: httpx.AsyncClient) -> None:
    """The idempotency layer stores a 405 like any answer; its replay must still say what is allowed."""
    headers = {"Idempotency-Key": "patch-checkout-1"}
    first = await client.patch("/v1/checkout", json={}, headers=headers)
    replay = await client.patch("/v1/checkout", json={}, headers=headers)
    assert replay.headers.get("idempotent-replayed") == "true"
    for response in (first, replay):
        assert response.status_code == 405
        assert _methods(response.headers["allow"]) == {"POST", "OPTIONS"}


async def test_options_on_an_unknown_path_is_404(client: httpx.AsyncClient) -> None:
    assert (await client.options("/v1/nothing-here")).status_code == 404


async def test_a_reservation_path_is_not_taken_for_a_sku(client: httpx.AsyncClient) -> None:
    """`/v1/inventory/{sku}` used to answer GET /v1/inventory/reservations with a SKU error."""
    response = await client.get("/v1/inventory/reservations")
    assert response.status_code == 405
    assert _methods(response.headers["allow"]) == {"POST", "OPTIONS"}


@pytest.mark.parametrize(
    "accept", ["text/html", "application/xml", "image/*", "text/csv;q=1, application/json;q=0"]
)
async def test_an_accept_no_route_serves_is_406(client: httpx.AsyncClient, accept: str) -> None:
    response = await client.get("/v1/products", headers={"Accept": accept})
    assert response.status_code == 406
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "/problems/not-acceptable"
    assert "application/json" in body["detail"]


@pytest.mark.parametrize(
    "accept",
    [
        "application/json",
        "*/*",
        "application/*",
        "text/html, application/json;q=0.5",
        "application/vnd.mercato.v1+json",
        "application/problem+json",
    ],
)
async def test_an_accept_the_route_serves_is_served(client: httpx.AsyncClient, accept: str) -> None:
    response = await client.get("/v1/products", headers={"Accept": accept})
    assert response.status_code == 200, response.text


async def test_documented_pages_keep_their_own_media_types(client: httpx.AsyncClient) -> None:
    assert (await client.get("/docs", headers={"Accept": "text/html"})).status_code == 200
    metrics = await client.get("/metrics", headers={"Accept": "text/plain;version=0.0.4"})
    assert metrics.status_code == 200


async def test_one_rule_for_400_and_422(client: httpx.AsyncClient) -> None:
    """Breaking the schema is 400 wherever it happens (body included); a schema-valid request that a
    rule refuses is 422."""
    malformed_json = await client.post(
        "/v1/auth/register", content=b"{not json", headers={"content-type": "application/json"}
    )
    wrong_type = await client.post("/v1/auth/register", json={"email": 5, "password": "x" * 12})
    bad_query = await client.get("/v1/products", params={"limit": 1000})
    bad_cursor_form = await client.get("/v1/products", params={"cursor": "not base64url!"})
    assert [r.status_code for r in (malformed_json, wrong_type, bad_query, bad_cursor_form)] == [400] * 4
    assert {r.json()["type"] for r in (malformed_json, wrong_type, bad_query)} == {
        "/problems/validation-error"
    }
    foreign_cursor = await client.get("/v1/products", params={"cursor": "AAAA"})
    range_backwards = await client.get("/v1/products", params={"min_price_minor": 10, "max_price_minor": 1})
    assert (foreign_cursor.status_code, foreign_cursor.json()["type"]) == (422, "/problems/invalid-cursor")
    assert range_backwards.status_code == 422


async def test_the_schema_states_the_servers_limits(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    quantity = components["CartItemIn"]["properties"]["quantity"]
    assert (quantity["minimum"], quantity["maximum"]) == (1, 99)
    assert components["RegisterIn"]["properties"]["email"]["pattern"]
    cursor = next(p for p in schema["paths"]["/v1/products"]["get"]["parameters"] if p["name"] == "cursor")
    assert cursor["schema"]["anyOf"][0]["pattern"] == "^[A-Za-z0-9_-]+$"
    price = next(
        p for p in schema["paths"]["/v1/products"]["get"]["parameters"] if p["name"] == "min_price_minor"
    )
    assert "max_price_minor" in price.get("description", "")
    assert "406" in schema["paths"]["/v1/products"]["get"]["responses"]
