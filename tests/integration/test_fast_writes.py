"""The checkout's two requests answered by the edge (`FastWrites`, ADR 0071): `PUT
/v1/carts/me/items/{sku}` and `POST /v1/checkout` get exactly the route's answers without routing or
dependency solving, and everything the routes' validation or auth would refuse is left to them."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from mercato.bootstrap import Container
from mercato.shop.cart.api import PUT_ITEM_ROUTE
from mercato.shop.cart.api import router as cart_router
from mercato.shop.checkout.api import CHECKOUT_ROUTE
from mercato.shop.checkout.api import router as checkout_router
from tests.integration.edge_apps import (
    client_for,
    record_route_calls,
    routed_paths,
    shop_app,
    stable_headers,
)
from tests.integration.shop_support import bearer, customer, product

# What differs between two answers to the same request by construction.
_PER_REQUEST = {"x-request-id", "date", "location", "etag"}
_JSON = {"Content-Type": "application/json"}


@pytest.fixture
def route_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, str]]:
    """Records (app, path) each time the PUT cart line or the checkout route itself runs."""
    return record_route_calls(monkeypatch, ((cart_router, PUT_ITEM_ROUTE), (checkout_router, CHECKOUT_ROUTE)))


def _calls(calls: list[tuple[object, str]], app: FastAPI) -> list[str]:
    return routed_paths(calls, app)


def _headers(response: httpx.Response) -> list[tuple[str, str]]:
    return stable_headers(response, _PER_REQUEST)


def _same(by_edge: httpx.Response, by_route: httpx.Response, *, ignore: tuple[str, ...] = ()) -> None:
    assert by_edge.status_code == by_route.status_code, (by_edge.text, by_route.text)
    assert _headers(by_edge) == _headers(by_route), (
        by_edge.request.url,
        _headers(by_edge),
        _headers(by_route),
    )
    if by_edge.headers.get("content-type", "").endswith("json") and by_edge.content:
        per_request = {"request_id": "", **dict.fromkeys(ignore, "")}
        assert {**by_edge.json(), **per_request} == {**by_route.json(), **per_request}
    else:
        assert by_edge.content == by_route.content


async def test_the_checkout_requests_are_answered_by_the_edge_exactly_as_the_routes_answer(
    container: Container, route_calls: list[tuple[object, str]]
) -> None:
    await product(container, "FAST-1", 1250)
    fast_app, slow_app = shop_app(container), shop_app(container, fast=False)
    _, fast_auth = await customer(container)
    _, slow_auth = await customer(container)
    async with client_for(fast_app) as fast, client_for(slow_app) as slow:
        for quantity in (2, 3.0):  # a whole float is the route's integer too (JsonInt)
            body = {"quantity": quantity}
            by_edge = await fast.put("/v1/carts/me/items/FAST-1", json=body, headers=fast_auth)
            by_route = await slow.put("/v1/carts/me/items/FAST-1", json=body, headers=slow_auth)
            assert by_edge.status_code == 200
            _same(by_edge, by_route)
            assert by_edge.content == by_route.content  # both carts hold the same line
            assert by_edge.headers["etag"] == by_route.headers["etag"]
            assert by_edge.headers["cache-control"] == "private, no-store"
        for body_bytes in (b"{}", b""):
            headers = {**_JSON, "Idempotency-Key": f"fast-{len(body_bytes)}"}
            by_edge = await fast.post("/v1/checkout", content=body_bytes, headers={**fast_auth, **headers})
            by_route = await slow.post("/v1/checkout", content=body_bytes, headers={**slow_auth, **headers})
            # The first empties the cart: the second is the service's 422 (an empty cart), rendered alike.
            _same(by_edge, by_route, ignore=("order_id",))
            if by_edge.status_code == 202:
                order_id = by_edge.json()["order_id"]
                assert by_edge.headers["location"] == f"/v1/orders/{order_id}"
                assert by_edge.json() == {**by_route.json(), "order_id": order_id}
            else:
                assert by_edge.status_code == 422
        # A retry with the same key is idempotency's replay, in front of either.
        headers = {**fast_auth, **_JSON, "Idempotency-Key": "fast-2"}
        replayed = await fast.post("/v1/checkout", content=b"{}", headers=headers)
        assert replayed.headers["idempotent-replayed"] == "true"
    assert _calls(route_calls, fast_app) == [], "the edge should answer both requests without routing"
    assert len(_calls(route_calls, slow_app)) == 4


async def test_what_the_routes_would_refuse_is_left_to_them(
    container: Container, route_calls: list[tuple[object, str]]
) -> None:
    await product(container, "FAST-2", 900)
    fast_app, slow_app = shop_app(container), shop_app(container, fast=False)
    _, auth = await customer(container)
    reader = await bearer(container, roles={"customer"}, scopes=frozenset({"cart:read"}))
    put = "/v1/carts/me/items/FAST-2"
    cases: list[tuple[str, str, dict[str, str], bytes]] = [
        ("PUT", put, {}, b'{"quantity":1}'),  # no token: 401
        ("PUT", put, {"Authorization": "Bearer not-a-token"}, b'{"quantity":1}'),  # 401
        ("PUT", put, reader, b'{"quantity":1}'),  # a scope missing: 403
        ("PUT", "/v1/carts/me/items/fast-2", auth, b'{"quantity":1}'),  # the path pattern: 400
        ("PUT", put, auth, b'{"quantity":"1"}'),  # strict: no strings
        ("PUT", put, auth, b'{"quantity":0}'),
        ("PUT", put, auth, b'{"quantity":1,"extra":true}'),
        ("PUT", put, auth, b'{"quantity":1'),  # not JSON: 400
        ("PUT", put, auth, b""),  # the body is required
        ("PUT", put, auth, b'{"quantity":100000}'),  # over the shop's limit: 400
        ("POST", "/v1/checkout", {**auth, "Idempotency-Key": "bad key!"}, b"{}"),  # the key's pattern
        ("POST", "/v1/checkout", {**auth, "Idempotency-Key": "k-body"}, b'{"card_token":""}'),
        ("POST", "/v1/checkout", {**reader, "Idempotency-Key": "k-scope"}, b"{}"),  # 403
    ]
    async with client_for(fast_app) as fast, client_for(slow_app) as slow:
        for method, url, headers, body in cases:
            sent = {**_JSON, **headers}
            # Each app its own key: both share the idempotency store, which would replay the first.
            key = sent.pop("Idempotency-Key", None)
            on_edge, on_route = (
                (sent, sent)
                if key is None
                else (
                    {**sent, "Idempotency-Key": key + "-e"},
                    {**sent, "Idempotency-Key": key + "-r"},
                )
            )
            by_edge = await fast.request(method, url, content=body, headers=on_edge)
            by_route = await slow.request(method, url, content=body, headers=on_route)
            assert by_edge.status_code in (400, 401, 403, 422), (method, url, body, by_edge.text)
            _same(by_edge, by_route)
            assert by_edge.headers["content-type"] == "application/problem+json"
        # Not JSON by its media type: the route decides what that means (it is no JSON body to it).
        text = {**auth, "Content-Type": "text/plain"}
        by_edge = await fast.put(put, content=b'{"quantity":1}', headers=text)
        _same(by_edge, await slow.put(put, content=b'{"quantity":1}', headers=text))
        # An error raised by the work itself (after auth) is rendered by the app's handlers, like the
        # route's, with Cache-Control: an unknown SKU (422).
        url, sent = "/v1/carts/me/items/NO-SUCH-SKU", {**_JSON, **auth}
        by_edge = await fast.put(url, content=b'{"quantity":1}', headers=sent)
        by_route = await slow.put(url, content=b'{"quantity":1}', headers=sent)
        assert by_edge.status_code == 422
        _same(by_edge, by_route)
        assert by_edge.headers["cache-control"] == "private, no-store"
    # Every refusal case reached the route (and the text/plain one), but the malformed key, which
    # idempotency refuses in front of both; the unknown SKU did not.
    assert len(_calls(route_calls, fast_app)) == len(cases) - 1 + 1
