"""The HTTP edge: problem+json everywhere, request ids, body limits, probes, no leaked internals."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from mercato.bootstrap import Container, build_container
from mercato.config import DatabaseSettings, HttpSettings
from mercato.gateway.app import create_app
from tests.conftest import make_settings


@pytest.fixture
async def client(container: Container, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(database_url, http=HttpSettings(max_body_bytes=4096))
    app = create_app(settings, container=container, configure_logs=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


def assert_problem(response: httpx.Response, status: int, type_: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["type"] == type_
    assert body["status"] == status
    assert body["request_id"] == response.headers["x-request-id"]
    return body


async def test_unknown_route_and_wrong_method_are_problems(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/nothing-here"), 404, "/problems/not-found")
    assert_problem(await client.delete("/v1/products"), 405, "/problems/method-not-allowed")


async def test_validation_errors_name_each_field(client: httpx.AsyncClient) -> None:
    body = assert_problem(
        await client.get("/v1/products", params={"limit": 0, "min_price_minor": -5}),
        400,
        "/problems/validation-error",
    )
    fields = {e["field"] for e in body["errors"]}  # type: ignore[attr-defined]
    assert fields == {"query.limit", "query.min_price_minor"}


async def test_body_over_the_limit_is_refused_before_parsing(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/products", content=b"x" * 5000, headers={"content-type": "application/json"}
    )
    assert_problem(response, 413, "/problems/payload-too-large")


async def test_malformed_json_is_a_400_problem(container: Container, database_url: str) -> None:
    from mercato.kit.auth import Principal

    app = create_app(make_settings(database_url), container=container, configure_logs=False)
    token = container.token_codec.issue(
        Principal("admin", frozenset({"admin"}), frozenset({"catalog:write"}))
    ).token
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        response = await http.post(
            "/v1/products",
            content=b"{not json",
            headers={"content-type": "application/json", "authorization": f"Bearer {token}"},
        )
    assert_problem(response, 400, "/problems/validation-error")


async def test_request_id_is_accepted_when_safe_and_replaced_when_not(client: httpx.AsyncClient) -> None:
    ok = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert ok.headers["x-request-id"] == "abc-123"
    unsafe = await client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces" + "x" * 200})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"
    assert len(unsafe.headers["x-request-id"]) == 32


async def test_unexpected_errors_leak_nothing_but_the_request_id(
    container: Container, database_url: str
) -> None:
    app: FastAPI = create_app(make_settings(database_url), container=container, configure_logs=False)

    async def explode() -> None:
        raise RuntimeError("SELECT secret FROM internals -- stack detail")

    app.add_api_route("/explode", explode)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        response = await http.get("/explode")
    body = assert_problem(response, 500, "/problems/internal-error")
    assert "secret" not in response.text
    assert "Traceback" not in response.text
    assert set(body) == {"type", "title", "status", "detail", "instance", "request_id", "errors"}


async def test_problem_types_are_documented(client: httpx.AsyncClient) -> None:
    catalogue = (await client.get("/problems")).json()
    slugs = {entry["type"] for entry in catalogue}
    assert {"/problems/validation-error", "/problems/product-not-found", "/problems/internal-error"} <= slugs
    one = await client.get("/problems/product-not-found")
    assert one.json()["title"] == "Product not found"
    assert_problem(await client.get("/problems/no-such-problem"), 404, "/problems/not-found")


async def test_probes(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json()["status"] == "ok"
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"][0]["name"] == "database"


async def test_readiness_names_the_failed_dependency_and_liveness_stays_up() -> None:
    # Nothing listens on port 1: the database check must fail fast and be named.
    settings = make_settings("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    settings.database = DatabaseSettings(url=settings.database.url, pool_timeout_s=1.0)
    broken = build_container(settings)
    app = create_app(settings, container=broken, configure_logs=False)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["status"] == "unavailable"
            checks = {c["name"]: c for c in ready.json()["checks"]}
            assert checks["database"]["ok"] is False
            assert checks["database"]["error"]
            assert (await http.get("/healthz")).status_code == 200
    finally:
        await broken.close()
