"""Traces, metrics and logs: each request gets a server span with a child span per DB call,
RED metrics by route template, and JSON log lines carrying the request id."""

from __future__ import annotations

import json
import random

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mercato.bootstrap import Container
from mercato.config import HttpSettings, TelemetrySettings
from mercato.demo.seed import demo_products
from mercato.gateway.app import create_app
from mercato.kit.observability import configure_logging
from tests.conftest import make_settings


async def test_request_span_has_a_child_span_per_database_call(
    container: Container, database_url: str
) -> None:
    [product] = await container.catalog.create_many(demo_products(1, random.Random(1)))
    exporter = InMemorySpanExporter()
    settings = make_settings(database_url, telemetry=TelemetrySettings(trace_exporter="memory"))
    app = create_app(settings, container=container, span_exporter=exporter, configure_logs=False)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        response = await http.get(f"/v1/products/{product.id}", headers={"traceparent": traceparent})
    assert response.status_code == 200
    spans = exporter.get_finished_spans()
    [server] = [s for s in spans if s.kind == SpanKind.SERVER]
    assert server.name == "GET /v1/products/{product_id}"
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 200
    # The incoming W3C trace context is continued, not replaced.
    assert format(server.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    db_spans = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert db_spans, "expected a span per database statement"
    select = [s for s in db_spans if s.attributes and s.attributes["db.operation"] == "SELECT"]
    assert select
    assert all(s.parent is not None and s.parent.span_id == server.context.span_id for s in select)
    assert all(s.context.trace_id == server.context.trace_id for s in db_spans)


async def test_red_metrics_use_route_templates_and_pool_gauges(
    container: Container, database_url: str
) -> None:
    app = create_app(make_settings(database_url), container=container, configure_logs=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        for suffix in ("a", "b", "c"):
            await http.get(f"/v1/products/missing-{suffix}")
        await http.get("/v1/products")
        text = (await http.get("/metrics")).text
    assert (
        'mercato_http_requests_total{method="GET",route="/v1/products/{product_id}",status="404"} 3.0' in text
    )
    assert 'mercato_http_requests_total{method="GET",route="/v1/products",status="200"} 1.0' in text
    assert "missing-a" not in text
    assert (
        'mercato_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/v1/products"}' in text
    )
    assert 'mercato_db_pool_connections{state="checked_out"}' in text


async def test_log_lines_are_json_with_request_id(
    container: Container, database_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    configure_logging(level="info", fmt="json")
    settings = make_settings(database_url, http=HttpSettings(access_log=True))
    app = create_app(settings, container=container, configure_logs=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        await http.get("/healthz", headers={"X-Request-ID": "log-test-1"})
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    [access] = [line for line in lines if line.get("event") == "http_request"]
    assert access["request_id"] == "log-test-1"
    assert access["route"] == "/healthz"
    assert access["status"] == 200
    assert {"ts", "level", "event"} <= set(access)


async def test_a_cached_reads_metrics_recorded_on_the_loop_reach_the_scrape_with_their_values(
    container: Container, database_url: str
) -> None:
    """The edge, the version step, the limiter and the cache record a cached read without a lock
    (ADR 0068): /metrics still shows each of those recordings, under the same names and labels."""
    [product] = await container.catalog.create_many(demo_products(1, random.Random(2)))
    app = create_app(make_settings(database_url), container=container, configure_logs=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        for _ in range(5):
            assert (await http.get(f"/v1/products/{product.id}")).status_code == 200
        text = (await http.get("/metrics")).text
    route = 'method="GET",route="/v1/products/{product_id}"'
    assert f'mercato_http_requests_total{{{route},status="200"}} 5.0' in text
    assert f"mercato_http_request_duration_seconds_count{{{route}}} 5.0" in text
    assert f'mercato_http_request_duration_seconds_bucket{{le="+Inf",{route}}} 5.0' in text
    assert 'mercato_http_requests_by_version_total{selected_by="path",version="v1"} 5.0' in text
    # The first read missed the application cache and loaded the product; the other four hit it.
    assert 'mercato_cache_requests_total{cache="products",result="miss",tier="memory"} 1.0' in text
    assert 'mercato_cache_requests_total{cache="products",result="hit",tier="memory"} 4.0' in text
    # Catalog reads are sheddable; the scrape itself (critical) was admitted before it ran.
    assert 'mercato_backpressure_queue_wait_seconds_count{class="sheddable"} 5.0' in text
    assert 'mercato_backpressure_queue_wait_seconds_count{class="critical"} 1.0' in text
