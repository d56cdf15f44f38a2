"""The application factory: one FastAPI app with the edge middleware and every context's routes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import CollectorRegistry

from mercato import __version__
from mercato.bootstrap import SCRIPT_LOCATION, SEED_MARKER, Container, build_container
from mercato.config import Settings, get_settings
from mercato.gateway.admin import router as admin_router
from mercato.gateway.caching import EdgeCacheMiddleware, document_cache_headers, public_catalog_policies
from mercato.gateway.errors import install_error_handlers
from mercato.gateway.media import build_signer
from mercato.gateway.media import router as media_router
from mercato.gateway.middleware import BodyLimitMiddleware, RequestContextMiddleware
from mercato.gateway.probes import router as probes_router
from mercato.gateway.ratelimit import document_rate_limits, install_rate_limiting
from mercato.gateway.shedding import SheddingMiddleware, build_limiter
from mercato.gateway.versioning import VersioningMiddleware, VersionMetrics, document_versioning
from mercato.kit.backpressure import PrometheusBackpressureMetrics
from mercato.kit.idempotency import IdempotencyMiddleware, PrometheusIdempotencyMetrics
from mercato.kit.observability import (
    HttpMetrics,
    build_tracer_provider,
    configure_logging,
    get_logger,
    instrument_engine,
    register_pool_gauges,
)
from mercato.kit.resilience import DeadlineMiddleware
from mercato.kit.storage import get_meta
from mercato.kit.storage.migrations import current_revisions, head_revisions
from mercato.kit.web.etags import PreconditionRequired, precondition_required_handler
from mercato.kit.web.forwarded import TrustedProxies
from mercato.kit.web.problems import PROBLEM_MEDIA_TYPE
from mercato.shop.cart.api import router as cart_router
from mercato.shop.catalog.api import router as catalog_router
from mercato.shop.catalog.api_v2 import router as catalog_v2_router
from mercato.shop.checkout.api import router as checkout_router
from mercato.shop.identity.api import router as identity_router
from mercato.shop.inventory.api import router as inventory_router
from mercato.shop.notifications.api import admin_router as notifications_admin_router
from mercato.shop.orders.api import admin_router as orders_admin_router
from mercato.shop.orders.api import router as orders_router
from mercato.shop.orders.api_v2 import router as orders_v2_router
from mercato.shop.payments.api import router as payments_router
from mercato.shop.reporting.api import admin_router as reporting_admin_router
from mercato.shop.reporting.api import router as reporting_router

ROUTERS = [
    catalog_router,
    identity_router,
    inventory_router,
    cart_router,
    orders_router,
    checkout_router,
    orders_admin_router,
    admin_router,
    media_router,
    catalog_v2_router,
    orders_v2_router,
    payments_router,
    reporting_router,
    reporting_admin_router,
    notifications_admin_router,
]

REQUIRE_IDEMPOTENCY_KEY = ("/v1/checkout",)

_log = get_logger("mercato.app")


def create_app(
    settings: Settings | None = None,
    *,
    container: Container | None = None,
    span_exporter: SpanExporter | None = None,
    configure_logs: bool = True,
) -> FastAPI:
    settings = settings or get_settings()
    settings.check_safe_to_start()
    if configure_logs:
        configure_logging(level=settings.telemetry.log_level, fmt=settings.telemetry.log_format)
    container = container or build_container(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _run_startup_checks(container)
        if container.cache_bus is not None:
            # Other processes' product changes drop this process's cached copies (kit/cache/bus.py).
            await container.cache_bus.start(timeout_s=1.0)
        try:
            yield
        finally:
            if rate_limiting is not None:
                await rate_limiting.aclose()
            await container.close()
            if tracer_provider is not None:
                tracer_provider.shutdown()

    app = FastAPI(
        title="Mercato API",
        version=__version__,
        description="An e-commerce backend: identity, catalog, inventory, cart and orders.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.container = container
    # Each context's routes find their service by name on app.state (catalog, identity, ...).
    for item in dataclasses.fields(container):
        setattr(app.state, item.name, getattr(container, item.name))

    registry = CollectorRegistry(auto_describe=True)
    metrics = HttpMetrics(registry)
    register_pool_gauges(registry, container.db.pool_status)
    # The container's own metrics (breakers, retries, bulkheads in front of the providers) are served
    # here too; registered as a collector because several apps may share one container (tests).
    registry.register(container.metrics_registry)
    app.state.metrics = metrics
    app.state.signing_settings = settings.signing
    app.state.url_signer = build_signer(settings.signing, clock=container.clock)
    app.state.cache_policies = public_catalog_policies(settings.edge_cache)

    tracer_provider = build_tracer_provider(
        service_name=settings.telemetry.service_name,
        exporter=settings.telemetry.trace_exporter,
        sample_ratio=settings.telemetry.trace_sample_ratio,
        otlp_endpoint=settings.telemetry.otlp_endpoint,
        span_exporter=span_exporter,
    )
    tracer = tracer_provider.get_tracer("mercato") if tracer_provider else None
    if tracer is not None:
        instrument_engine(container.db.engine, tracer)

    install_error_handlers(app)
    # 428 is no domain error kind: a conditional-request rule of the HTTP edge (RFC 6585).
    app.add_exception_handler(PreconditionRequired, precondition_required_handler)
    app.include_router(probes_router)
    for router in ROUTERS:
        app.include_router(router)

    # Added innermost first: the request context wraps everything, including the body limit.
    # Unsafe requests with an Idempotency-Key replay their first response (API-CONVENTIONS);
    # checkout demands one. Auth responses carry tokens and are never stored.
    app.add_middleware(
        IdempotencyMiddleware,
        store=container.idempotency,
        required_paths=REQUIRE_IDEMPOTENCY_KEY,
        excluded_paths=(re.compile(r"^/v1/auth/"),),
        ttl_s=settings.idempotency.ttl_s,
        lock_timeout_s=settings.idempotency.lock_timeout_s,
        hook=PrometheusIdempotencyMetrics(registry),
    )
    # Before routing and idempotency (both must see the version the request was rewritten to):
    # `Accept: application/vnd.mercato.v2+json` selects /v2, and v1 answers carry Deprecation/Sunset.
    app.add_middleware(
        VersioningMiddleware,
        routes=[route for router in ROUTERS for route in router.routes],
        metrics=VersionMetrics(registry),
    )
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.http.max_body_bytes)
    # Right inside the request context: an incoming X-Request-Deadline bounds everything the request
    # does (every provider call reads it), and a DeadlineExceeded still gets the request id.
    app.add_middleware(DeadlineMiddleware)
    # Public catalog reads tell a CDN or reverse proxy how long it may keep them (RFC 9111).
    app.add_middleware(EdgeCacheMiddleware, policies=app.state.cache_policies)
    # Inside the load shedder (a shed request costs no limiter call) and the request context (a 429
    # gets the request id and RED metrics), outside routing, idempotency and the body limit.
    rate_limiting = install_rate_limiting(
        app,
        settings=settings.ratelimit,
        codec=container.token_codec,
        health=container.health,
        registry=registry,
        clock=container.clock,
    )
    if settings.backpressure.enabled:
        # Right inside the request context (a 503 still gets the request id and RED metrics) and
        # outside everything else, so a shed request costs no routing, auth or database work.
        app.add_middleware(
            SheddingMiddleware,
            limiter=build_limiter(
                settings.backpressure, clock=container.clock, hook=PrometheusBackpressureMetrics(registry)
            ),
        )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        tracer=tracer,
        access_log=settings.http.access_log,
        trusted_proxies=TrustedProxies.parse(settings.network.trusted_proxies),
        forwarded_header=settings.network.forwarded_header,
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


async def _run_startup_checks(container: Container) -> None:
    health = container.health
    health.expect_startup_step("migrations")
    if container.settings.seed.required:
        health.expect_startup_step("seed")
    head = head_revisions(SCRIPT_LOCATION)
    current = await current_revisions(container.db)
    if current == head:
        health.mark_started("migrations")
    else:
        _log.warning("migrations_pending", current=sorted(current), head=sorted(head))
    if container.settings.seed.required and current == head:
        async with container.db.read() as conn:
            if await get_meta(conn, SEED_MARKER):
                health.mark_started("seed")


_PROBLEM_REF = {"$ref": "#/components/schemas/ProblemDetails"}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_MEDIA_TYPE: {"schema": _PROBLEM_REF}}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with the problem responses every route can give added or corrected."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    from mercato.kit.web.problems import ProblemDetails

    if "ProblemDetails" not in components:
        components["ProblemDetails"] = ProblemDetails.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
    for defn in (
        ProblemDetails.model_json_schema(ref_template="#/components/schemas/{model}").get("$defs", {}).items()
    ):
        components.setdefault(defn[0], defn[1])
    components["ProblemDetails"].pop("$defs", None)
    for path_item in schema.get("paths", {}).values():
        for method, operation in path_item.items():
            responses = operation.setdefault("responses", {})
            has_params = bool(operation.get("parameters"))
            has_body = "requestBody" in operation
            if "422" in responses or has_body:
                responses["422"] = _problem("The request body failed validation or broke a rule")
            if has_params or has_body:
                responses.setdefault("400", _problem("Malformed query, path or header"))
            if has_body or method in ("post", "put", "patch"):
                responses.setdefault("413", _problem("Request body too large"))
            responses.setdefault("500", _problem("Unexpected error (carries only the request id)"))
    document_cache_headers(schema, app.state.cache_policies)
    document_rate_limits(schema)
    document_versioning(schema)
    app.openapi_schema = schema
    return schema
