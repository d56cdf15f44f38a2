"""The edge as one layer (ADR 0054): its steps run in the documented order, a step's refusal skips the
rest, and `GET /v1/products/{id}` is answered by the edge itself (no routing, no dependency solving)
with exactly the bytes and headers the route gives, on both engines and with the cache on or off."""

from __future__ import annotations

import asyncio
import gc
import uuid

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from uvicorn.server import ServerState

from mercato.bootstrap import Container
from mercato.gateway.fast_reads import PRODUCT_ROUTE
from mercato.kit.web.http_protocol import MercatoHttpProtocol
from mercato.shop.catalog.api import router as catalog_router
from tests.integration.edge_apps import (
    client_for,
    edge_of,
    record_route_calls,
    routed_paths,
    shop_app,
    stable_headers,
)
from tests.integration.shop_support import product
from tests.integration.statement_budget import counting
from tests.recording_transport import RecordingTransport

# What differs between two answers to the same request by construction.
_PER_REQUEST = {"x-request-id", "date"}


@pytest.fixture
def route_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, str]]:
    """Records (app, path) each time the product route itself runs (after routing matched it)."""
    return record_route_calls(monkeypatch, ((catalog_router, PRODUCT_ROUTE),))


def _calls(calls: list[tuple[object, str]], app: FastAPI) -> list[str]:
    return routed_paths(calls, app)


def _headers(response: httpx.Response) -> list[tuple[str, str]]:
    return stable_headers(response, _PER_REQUEST)


async def test_the_app_runs_one_edge_with_its_steps_in_order(container: Container) -> None:
    edge = edge_of(shop_app(container))
    outer = [type(getattr(step, "__self__", step)).__name__ for step in edge.outer]
    inner = [type(step).__name__ for step in edge.inner]
    assert outer == [
        "BodyLimit",
        "Shedding",
        "RateLimit",
        "ApiKeyCheck",
        "EdgeCache",
        "Deadline",
        "Versioning",
        "MethodsAndMedia",  # its 405 Allow, outside idempotency
    ]
    assert edge.idempotency is not None
    assert inner == ["StalenessHeader", "MethodsAndMedia", "FastReads", "FastWrites"]


async def test_a_product_read_is_answered_by_the_edge_exactly_as_the_route_answers(
    container: Container, route_calls: list[tuple[object, str]]
) -> None:
    item = await product(container, "EDGE-1", 2500)
    url = f"/v1/products/{item.id}"
    fast_app, slow_app = shop_app(container), shop_app(container, fast=False)
    async with client_for(fast_app) as fast, client_for(slow_app) as slow:
        for headers in ({}, {"Accept": "application/json"}):
            by_edge, by_route = await fast.get(url, headers=headers), await slow.get(url, headers=headers)
            assert by_edge.status_code == by_route.status_code == 200
            assert by_edge.content == by_route.content
            assert _headers(by_edge) == _headers(by_route)
        etag = by_edge.headers["etag"]
        by_edge, by_route = (
            await fast.get(url, headers={"If-None-Match": etag}),
            await slow.get(url, headers={"If-None-Match": etag}),
        )
        assert by_edge.status_code == by_route.status_code == 304
        assert by_edge.content == by_route.content == b""
        assert _headers(by_edge) == _headers(by_route)
        missing = f"/v1/products/{uuid.uuid4()}"
        by_edge, by_route = await fast.get(missing), await slow.get(missing)
        assert by_edge.status_code == by_route.status_code == 404
        assert by_edge.headers["content-type"] == "application/problem+json"
        assert by_edge.json()["request_id"] == by_edge.headers["x-request-id"]
        assert {**by_edge.json(), "request_id": ""} == {**by_route.json(), "request_id": ""}
    assert _calls(route_calls, fast_app) == [], "the edge should answer product reads without routing"
    assert len(_calls(route_calls, slow_app)) == 4


async def test_what_the_edge_does_not_serve_goes_on_to_the_route(
    container: Container, route_calls: list[tuple[object, str]]
) -> None:
    item = await product(container, "EDGE-2", 900)
    app = shop_app(container)
    async with client_for(app) as client:
        # A path parameter over the route's bound, an If-None-Match over its bound: the route's 400.
        assert (await client.get("/v1/products/" + "x" * 65)).status_code == 400
        too_long = await client.get(f"/v1/products/{item.id}", headers={"If-None-Match": "x" * 5000})
        assert too_long.status_code == 400
        # Accept selecting v2 is rewritten by the versioning step before the fast path looks.
        v2 = await client.get(
            f"/v1/products/{item.id}", headers={"Accept": "application/vnd.mercato.v2+json"}
        )
        assert v2.status_code == 200
        assert v2.json()["status"] == "active"
    assert len(_calls(route_calls, app)) == 2


async def test_a_cached_read_through_the_edge_touches_no_database_and_keeps_every_header(
    container: Container, route_calls: list[tuple[object, str]]
) -> None:
    assert container.product_cache is not None
    item = await product(container, "EDGE-3", 1200)
    url = f"/v1/products/{item.id}"
    app = shop_app(container)
    async with client_for(app) as client:
        first = await client.get(url)
        with counting(container) as tally:
            again = await client.get(url)
            revalidated = await client.get(url, headers={"If-None-Match": first.headers["etag"]})
        assert tally.statements == [], tally.report()
    assert _calls(route_calls, app) == []
    assert again.content == first.content
    assert revalidated.status_code == 304
    # Every step's header work still happens on the edge's answer: versioning, edge cache, request id.
    assert again.headers["deprecation"].startswith("@")
    assert again.headers["link"] == f'</v2/products/{item.id}>; rel="successor-version"'
    assert again.headers["vary"] == "Accept, Accept-Encoding"
    assert again.headers["cache-control"].startswith("public, max-age=")
    assert revalidated.headers["cache-control"] == again.headers["cache-control"]
    assert len(again.headers["x-request-id"]) == 32
    assert again.headers["surrogate-key"] == f"product:{item.id} products"


async def test_a_refusing_step_answers_before_the_later_steps_and_the_route(
    container: Container, route_calls: list[tuple[object, str]]
) -> None:
    item = await product(container, "EDGE-4", 700)
    app = shop_app(container)
    async with client_for(app) as client:
        # 406 from the media check: a product read is never served to a client that cannot read JSON.
        refused = await client.get(f"/v1/products/{item.id}", headers={"Accept": "text/html"})
        options = await client.options(f"/v1/products/{item.id}")
    assert refused.status_code == 406
    assert refused.headers["content-type"] == "application/problem+json"
    assert options.status_code == 204
    assert options.headers["allow"] == "GET, HEAD, PATCH, OPTIONS"
    assert _calls(route_calls, app) == []


async def test_cached_reads_through_the_server_protocol_leave_no_reference_cycle(
    container: Container,
) -> None:
    """Every object a cached read makes is freed by its reference count as the request ends: none is
    left for the cycle collector, whose passes cost more than the read itself when each request left
    its exchange, scope, uvicorn cycle and task context in a cycle (ADR 0068)."""
    item = await product(container, "EDGE-5", 900)
    app = shop_app(container)
    config = uvicorn.Config(app, log_config=None, lifespan="off", server_header=False)
    state = ServerState()
    protocol = MercatoHttpProtocol(config=config, server_state=state, app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    reads = [
        f"GET /v1/products/{item.id} HTTP/1.1\r\nHost: t\r\n\r\n".encode(),
        b"GET /v1/products?category=books HTTP/1.1\r\nHost: t\r\nAccept: application/json\r\n\r\n",
    ]

    async def serve(request: bytes) -> bytes:
        transport.writes.clear()
        protocol.data_received(request)
        await asyncio.gather(*state.tasks)
        await asyncio.sleep(0)
        return b"".join(transport.writes)

    for request in reads:  # the first of each fills the cache and the steps' memo tables
        assert (await serve(request)).startswith(b"HTTP/1.1 200 OK")
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for request in reads * 3:
            assert (await serve(request)).startswith(b"HTTP/1.1 200 OK")
        gc.collect()
        left = sorted({type(found).__qualname__ for found in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
