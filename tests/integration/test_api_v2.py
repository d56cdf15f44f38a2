"""API v2 on both engines: its representations, Accept negotiation, v1 deprecation, version metrics."""

from __future__ import annotations

import httpx

from mercato.bootstrap import Container
from mercato.gateway.versioning import V1_POLICY
from tests.integration.shop_support import admin, api, customer, product

V2_MEDIA = "application/vnd.mercato.v2+json"


def assert_deprecated(response: httpx.Response, successor: str) -> None:
    assert response.headers["deprecation"] == f"@{int(V1_POLICY.deprecated_at.timestamp())}"
    assert response.headers["sunset"] == "Tue, 30 Nov 2027 23:59:59 GMT"
    assert response.headers["link"] == f'<{successor}>; rel="successor-version"'


def assert_current(response: httpx.Response) -> None:
    assert "deprecation" not in response.headers
    assert "sunset" not in response.headers


async def test_v2_products_show_money_as_exact_decimal_strings(container: Container) -> None:
    book = await product(container, "V2-EUR", 1999, name="A Book")
    await product(container, "V2-JPY", 1999, currency="JPY")
    await product(container, "V2-KWD", 5, currency="KWD")
    async with api(container) as client:
        one = await client.get(f"/v2/products/{book.id}")
        assert one.status_code == 200
        body = one.json()
        assert body["price"] == {"amount": "19.99", "currency": "EUR"}
        assert body["status"] == "active"
        assert {"price_minor", "currency", "archived", "version"}.isdisjoint(body)
        assert one.headers["content-type"] == "application/json"
        assert_current(one)
        assert "accept" in one.headers["vary"].lower()

        listed = await client.get("/v2/products", params={"limit": 2, "sort": "name"})
        page = listed.json()
        more = await client.get(
            "/v2/products", params={"limit": 2, "sort": "name", "cursor": page["next_cursor"]}
        )
        prices = {p["sku"]: p["price"]["amount"] for p in page["items"] + more.json()["items"]}
        assert prices == {"V2-EUR": "19.99", "V2-JPY": "1999", "V2-KWD": "0.005"}
        assert more.json()["next_cursor"] is None

        await container.catalog.archive(book.id)
        assert (await client.get(f"/v2/products/{book.id}")).json()["type"] == "/problems/product-not-found"


async def test_v2_orders_show_totals_and_line_prices_as_money(container: Container) -> None:
    await product(container, "V2-ORD", 1250)
    _, me = await customer(container)
    async with api(container) as client:
        await client.put("/v1/carts/me/items/V2-ORD", json={"quantity": 3}, headers=me)
        placed = await client.post("/v1/checkout", headers={**me, "Idempotency-Key": "v2-ord"})
        v1 = (await client.get(placed.headers["location"], headers=me)).json()

        order = (await client.get(f"/v2/orders/{v1['id']}", headers=me)).json()
        assert order["total"] == {"amount": "37.50", "currency": "EUR"}
        line = order["lines"][0]
        assert (line["unit_price"], line["line_total"], line["quantity"]) == (
            {"amount": "12.50", "currency": "EUR"},
            {"amount": "37.50", "currency": "EUR"},
            3,
        )
        assert {"total_minor", "currency", "version"}.isdisjoint(order)
        assert (order["status"], order["id"]) == (v1["status"], v1["id"])

        mine = await client.get("/v2/orders", headers=me)
        assert mine.headers["cache-control"] == "private, no-store"
        assert [o["total"]["amount"] for o in mine.json()["items"]] == ["37.50"]
        assert (await client.get("/v2/orders")).status_code == 401


async def test_accept_selects_v2_on_a_v1_path(container: Container) -> None:
    item = await product(container, "NEG-1", 1999)
    async with api(container) as client:
        plain = await client.get(f"/v1/products/{item.id}")
        assert plain.json()["price_minor"] == 1999
        assert plain.headers["content-type"] == "application/json"
        assert_deprecated(plain, f"/v2/products/{item.id}")
        assert "accept" in plain.headers["vary"].lower()

        negotiated = await client.get(f"/v1/products/{item.id}", headers={"Accept": V2_MEDIA})
        assert negotiated.status_code == 200
        assert negotiated.json()["price"] == {"amount": "19.99", "currency": "EUR"}
        assert negotiated.headers["content-type"] == V2_MEDIA
        assert negotiated.headers["etag"].endswith('.v2"')
        assert "accept" in negotiated.headers["vary"].lower()
        assert_current(negotiated)

        # The highest quality wins; q=0 means "not this one".
        preferred = await client.get(
            f"/v1/products/{item.id}", headers={"Accept": f"application/json;q=0.5, {V2_MEDIA}"}
        )
        assert "price" in preferred.json()
        refused = await client.get(f"/v1/products/{item.id}", headers={"Accept": f"{V2_MEDIA};q=0"})
        assert "price_minor" in refused.json()

        # A v1 list keeps its query: the Link points at the same page in v2.
        listed = await client.get("/v1/products", params={"limit": 5})
        assert_deprecated(listed, "/v2/products?limit=5")

        # Errors of a negotiated request stay problem+json.
        missing = await client.get("/v1/products/not-an-id", headers={"Accept": V2_MEDIA})
        assert missing.headers["content-type"] == "application/problem+json"
        # Any character in the path reaches the Link header percent-encoded, never as a 500.
        for accept in ("application/json", V2_MEDIA):
            odd = await client.get("/v1/products/%C3%A9%F0%9F%98%80%1A", headers={"Accept": accept})
            assert odd.status_code == 404
        odd_v1 = await client.get("/v1/products/%C3%A9%F0%9F%98%80%1A")
        assert odd_v1.headers["link"] == '</v2/products/%C3%A9%F0%9F%98%80%1A>; rel="successor-version"'

        # Asking for v1 on a v2 path works the other way round, and says v1 is deprecated.
        down = await client.get(
            f"/v2/products/{item.id}", headers={"Accept": "application/vnd.mercato.v1+json"}
        )
        assert down.json()["price_minor"] == 1999
        assert down.headers["content-type"] == "application/vnd.mercato.v1+json"
        assert_deprecated(down, f"/v2/products/{item.id}")


async def test_resources_without_v2_are_neither_rewritten_nor_deprecated(container: Container) -> None:
    item = await product(container, "NEG-2", 100)
    _, me = await customer(container)
    async with api(container) as client:
        cart = await client.get("/v1/carts/me", headers={**me, "Accept": V2_MEDIA})
        assert cart.status_code == 200
        assert cart.headers["content-type"] == "application/json"
        assert_current(cart)
        assert "link" not in cart.headers

        # Admin writes are v1 only: not deprecated, and Accept cannot send them anywhere else.
        tag = (await client.get(f"/v1/products/{item.id}")).headers["etag"]
        patched = await client.patch(
            f"/v1/products/{item.id}",
            json={"name": "Still v1"},
            headers={**await admin(container), "If-Match": tag, "Accept": V2_MEDIA},
        )
        assert patched.status_code == 200
        assert patched.json()["name"] == "Still v1"
        assert_current(patched)


async def test_requests_are_counted_by_served_version(container: Container) -> None:
    item = await product(container, "MET-1", 100)
    async with api(container) as client:
        await client.get(f"/v1/products/{item.id}")
        await client.get(f"/v1/products/{item.id}", headers={"Accept": V2_MEDIA})
        await client.get(f"/v2/products/{item.id}")
        await client.get("/healthz")
        text = (await client.get("/metrics")).text
    assert 'mercato_http_requests_by_version_total{selected_by="path",version="v1"} 1.0' in text
    assert 'mercato_http_requests_by_version_total{selected_by="accept",version="v2"} 1.0' in text
    assert 'mercato_http_requests_by_version_total{selected_by="path",version="v2"} 1.0' in text
    # The RED metrics name the route that really ran, by template.
    assert (
        'mercato_http_requests_total{method="GET",route="/v2/products/{product_id}",status="200"} 2.0' in text
    )


async def test_openapi_documents_versions_and_preconditions(container: Container) -> None:
    async with api(container) as client:
        spec = (await client.get("/openapi.json")).json()
    v1_get = spec["paths"]["/v1/products/{product_id}"]["get"]
    assert v1_get["deprecated"] is True
    ok = v1_get["responses"]["200"]
    assert {"Deprecation", "Sunset", "Link", "ETag", "Vary"} <= set(ok["headers"])
    assert {"application/json", V2_MEDIA} <= set(ok["content"])
    assert "304" in v1_get["responses"]
    assert "deprecated" not in spec["paths"]["/v2/products/{product_id}"]["get"]
    patch = spec["paths"]["/v1/products/{product_id}"]["patch"]
    assert "deprecated" not in patch
    assert {"412", "428"} <= set(patch["responses"])
    assert "if-match" in {p["name"].lower() for p in patch["parameters"]}
    assert spec["paths"]["/v1/orders/{order_id}"]["get"]["deprecated"] is True
    assert "deprecated" not in spec["paths"]["/v1/carts/me"]["get"]
