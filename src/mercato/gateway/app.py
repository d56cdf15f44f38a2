"""The application factory: one FastAPI app behind the edge (ADR 0054) with every context's routes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import SQLAlchemyError
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from mercato import __version__
from mercato.bootstrap import SCRIPT_LOCATION, SEED_MARKER, Container, build_container
from mercato.config import Settings, get_settings
from mercato.gateway.access_docs import STAFF_SCOPES, document_access
from mercato.gateway.admin import router as admin_router
from mercato.gateway.api_keys import ApiKeyCheck
from mercato.gateway.caching import EdgeCache, document_cache_headers, public_catalog_policies
from mercato.gateway.consistency import ConsistencyToken, StalenessHeader
from mercato.gateway.docs import install_docs
from mercato.gateway.edge import Deadline, Edge, Step
from mercato.gateway.errors import install_error_handlers
from mercato.gateway.fast_reads import FastReads
from mercato.gateway.fast_writes import FastWrites
from mercato.gateway.faults import LatencyFault
from mercato.gateway.media import build_signer
from mercato.gateway.media import router as media_router
from mercato.gateway.methods import MethodsAndMedia
from mercato.gateway.middleware import BodyLimit
from mercato.gateway.privacy import admin_router as privacy_admin_router
from mercato.gateway.privacy import router as privacy_router
from mercato.gateway.probes import router as probes_router
from mercato.gateway.ratelimit import RateLimit, document_rate_limits, install_rate_limiting
from mercato.gateway.realtime import RealtimeRuntime
from mercato.gateway.realtime import router as realtime_router
from mercato.gateway.release import FaultInjection, edge_preparers
from mercato.gateway.shedding import Shedding, build_limiter
from mercato.gateway.versioning import Versioning, VersionMetrics, document_versioning
from mercato.kit.backpressure import PrometheusBackpressureMetrics
from mercato.kit.idempotency import IdempotencyMiddleware, PrometheusIdempotencyMetrics
from mercato.kit.observability import (
    HttpMetrics,
    build_tracer_provider,
    configure_logging,
    fastapi_native_tracing_off,
    get_logger,
    install_tracer_provider,
    instrument_engine,
    register_pool_gauges,
    register_process_collectors,
)
from mercato.kit.privacy import AuditLog
from mercato.kit.storage import get_meta
from mercato.kit.storage.migrations import current_revisions, head_revisions
from mercato.kit.storage.statements import trace_driver_statements
from mercato.kit.web.etags import PreconditionRequired, precondition_required_handler
from mercato.kit.web.forwarded import TrustedProxies
from mercato.kit.web.problems import PROBLEM_MEDIA_TYPE
from mercato.shop.cart.api import document_cart_limits
from mercato.shop.cart.api import router as cart_router
from mercato.shop.catalog.api import router as catalog_router
from mercato.shop.catalog.api_v2 import router as catalog_v2_router
from mercato.shop.chat.admin_api import admin_router as chat_admin_router
from mercato.shop.chat.api import router as chat_router
from mercato.shop.checkout.api import router as checkout_router
from mercato.shop.identity.api import router as identity_router
from mercato.shop.identity.api_keys_api import admin_router as api_keys_admin_router
from mercato.shop.identity.jwks_api import router as jwks_router
from mercato.shop.inventory.api import router as inventory_router
from mercato.shop.notifications.api import admin_router as notifications_admin_router
from mercato.shop.orders.api import admin_router as orders_admin_router
from mercato.shop.orders.api import router as orders_router
from mercato.shop.orders.api_live import router as orders_live_router
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
    api_keys_admin_router,
    orders_live_router,
    chat_router,
    chat_admin_router,
    realtime_router,
    jwks_router,
    privacy_router,
    privacy_admin_router,
]

REQUIRE_IDEMPOTENCY_KEY = ("/v1/checkout",)

_log = get_logger("mercato.app")


def create_app(
    settings: Settings | None = None,
    *,
    container: Container | None = None,
    span_exporter: SpanExporter | None = None,
    configure_logs: bool = True,
    trace_role: str = "api",
) -> FastAPI:
    settings = settings or get_settings()
    settings.check_safe_to_start()
    if configure_logs:
        configure_logging(level=settings.telemetry.log_level, fmt=settings.telemetry.log_format)
    container = container or build_container(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # SIGTERM → /readyz 503 for drain_s, then the server's graceful stop (ADR 0040).
        container.health.drain.install(asyncio.get_running_loop())
        await _run_startup_checks(container)
        # The signing keys (first start creates one), then reloaded every signing_key_reload_s.
        reloader = None
        if container.signing_keys is not None:
            try:
                await container.signing_keys.ready()
            except (SQLAlchemyError, OSError):  # e.g. migrations pending: the reloader retries
                _log.warning("signing_keys_not_loaded", exc_info=True)
            reloader = asyncio.create_task(container.signing_keys.run_reloader())
        try:
            # A keyring database of its own gets its tables; accounts stored before sealing are sealed.
            if container.keyring is not None:
                await container.keyring.ensure_schema()
            await container.identity.seal_at_startup()
        except (SQLAlchemyError, OSError):  # e.g. migrations pending: the next start seals them
            _log.warning("personal_data_not_sealed", exc_info=True)
        runtime_task = None
        if container.runtime is not None:
            # The latest runtime configuration before serving, then polled (ADR 0045).
            container.runtime.identity = dataclasses.replace(container.runtime.identity, role="api")
            try:
                await container.runtime.poll_once()
            except (SQLAlchemyError, OSError):
                _log.warning("runtime_config_not_loaded", exc_info=True)
            runtime_task = asyncio.create_task(container.runtime.run())
        await realtime.start()
        if container.cache_bus is not None:
            # Other processes' product changes drop this process's cached copies (kit/cache/bus.py).
            await container.cache_bus.start(timeout_s=1.0)
        try:
            yield
        finally:
            container.health.drain.uninstall()
            await realtime.stop()
            if runtime_task is not None:
                runtime_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runtime_task
            if reloader is not None:
                reloader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reloader
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
        # Served by install_docs from packaged assets, not FastAPI's CDN pages (ADR 0028).
        docs_url=None,
        redoc_url=None,
        # One server span per request, ours (the edge's), not FastAPI's as well.
        **fastapi_native_tracing_off(),
    )
    app.state.container = container
    realtime = RealtimeRuntime(container)
    app.state.realtime = realtime
    # Each context's routes find their service by name on app.state (catalog, identity, ...).
    for item in dataclasses.fields(container):
        setattr(app.state, item.name, getattr(container, item.name))

    registry = CollectorRegistry(auto_describe=True)
    metrics = HttpMetrics(registry)
    register_pool_gauges(registry, container.db.pool_status)
    register_process_collectors(registry)
    # The container's own metrics (breakers, retries, bulkheads in front of the providers) are served
    # here too; registered as a collector because several apps may share one container (tests).
    registry.register(container.metrics_registry)
    app.state.metrics = metrics
    # Bearer tokens are put to the session guard after verification (revoked, subject gone).
    app.state.token_guard = container.sessions
    # Every use of a staff scope is recorded before it runs (kit/privacy/audit.py).
    app.state.audit_log = AuditLog(
        container.db,
        container.clock,
        audited_scopes=STAFF_SCOPES,
        retention_days=settings.privacy.audit_retention_days,
    )
    app.state.api_key_header = settings.ratelimit.api_key_header
    app.state.signing_settings = settings.signing
    app.state.url_signer = build_signer(settings.signing, clock=container.clock)
    app.state.cache_policies = public_catalog_policies(settings.edge_cache)

    tracer_provider = build_tracer_provider(
        service_name=settings.telemetry.service_name,
        exporter=settings.telemetry.trace_exporter,
        sample_ratio=settings.telemetry.trace_sample_ratio,
        otlp_endpoint=settings.telemetry.otlp_endpoint,
        span_exporter=span_exporter,
        role=trace_role,
    )
    tracer = tracer_provider.get_tracer("mercato") if tracer_provider else None
    if tracer_provider is not None and span_exporter is None:
        # The process's provider: the outbox, the saga store and the provider clients continue the
        # request's trace through it (a test's in-memory provider stays the app's own).
        install_tracer_provider(tracer_provider)
    if tracer is not None:
        instrument_engine(container.db.engine, tracer, only_in_trace=True)
        trace_driver_statements(tracer, only_in_trace=True)

    install_error_handlers(app)
    install_docs(app)
    # 428 is no domain error kind: a conditional-request rule of the HTTP edge (RFC 6585).
    app.add_exception_handler(PreconditionRequired, precondition_required_handler)
    app.include_router(probes_router)
    for router in ROUTERS:
        app.include_router(router)

    rate_limiting = install_rate_limiting(
        app,
        settings=settings.ratelimit,
        codec=container.token_codec,
        health=container.health,
        registry=registry,
        clock=container.clock,
        api_keys=container.api_keys,
    )
    limiter = None
    if settings.backpressure.enabled:
        limiter = build_limiter(
            settings.backpressure, clock=container.clock, hook=PrometheusBackpressureMetrics(registry)
        )
    if container.runtime is not None:
        # Limits, policies and lifetimes follow the runtime configuration (ADR 0045).
        for preparer in edge_preparers(
            rate_limiting=rate_limiting, limiter=limiter, cache_policies=app.state.cache_policies
        ):
            container.runtime.on_change(preparer)
    app.state.release_track = settings.release.track
    app.state.load_shedder = limiter
    methods = MethodsAndMedia(
        fastapi_app=app,
        routes=[
            *(route for route in app.router.routes if isinstance(route, Route | Mount)),
            *(route for router in (probes_router, *ROUTERS) for route in router.routes),
        ],
    )
    # The edge's steps, in the order they run (ADR 0054; docs/architecture.md "The request path").
    outer: list[Step] = []
    if settings.release.inject_error_ratio > 0:
        # A lab's bad build (dev/test only): inside the request context, so metrics count its 500s.
        outer.append(FaultInjection(ratio=settings.release.inject_error_ratio))
    if settings.http.fault_delay_ms > 0:  # the lab's slow-instance switch (gateway/faults.py)
        outer.append(LatencyFault(delay_s=settings.http.fault_delay_ms / 1000))
    # Before every step that reads the body (the limiter keys login attempts by e-mail, idempotency
    # fingerprints it): all of them read through its bounded, timed `receive` (408/413, ADR 0028).
    outer.append(
        BodyLimit(
            max_body_bytes=settings.http.max_body_bytes, body_read_timeout_s=settings.http.body_read_timeout_s
        )
    )
    if limiter is not None:
        # First after the body limit: a shed request costs no limiter call, routing, auth or database work.
        outer.append(Shedding(limiter=limiter))
    if rate_limiting is not None:
        outer.append(RateLimit(limiting=rate_limiting))
    if container.api_keys is not None:
        # After the limiter (which charges a request with a made-up key to its address first): an
        # unknown or revoked X-API-Key is a 401; a verified one is the request's principal.
        outer.append(ApiKeyCheck(verifier=container.api_keys, header_name=settings.ratelimit.api_key_header))
    # Public catalog reads tell a CDN or reverse proxy how long it may keep them (RFC 9111).
    outer.append(EdgeCache(policies=app.state.cache_policies))
    # An incoming X-Request-Deadline bounds everything after it (every provider call reads it).
    outer.append(Deadline())
    # Before routing and idempotency (both must see the version the request was rewritten to):
    # `Accept: application/vnd.mercato.v2+json` selects /v2, and v1 answers carry Deprecation/Sunset.
    outer.append(
        Versioning(
            routes=[route for router in ROUTERS for route in router.routes], metrics=VersionMetrics(registry)
        )
    )
    # Outside idempotency: a replayed 405 lists the full Allow as well.
    outer.append(methods.allow_on_405)
    inner: list[Step] = []
    if container.db.replicas is not None:
        # The token scope must wrap the handler's reads and writes (ADR 0032).
        inner.append(ConsistencyToken())
    # A cache serving stale data records it in the request's scope (docs/consistency.md).
    inner.append(StalenessHeader())
    # On the path the versioning rewrote: OPTIONS, and 406 before the route runs (ADR 0028).
    inner.append(methods)
    # Last: the hot public reads and the checkout's two writes answered from the edge, past every
    # check above (and idempotency's, for the POST).
    inner.append(FastReads(app=app))
    inner.append(FastWrites(app=app))

    def idempotency(app_inside: ASGIApp) -> ASGIApp:
        # Unsafe requests with an Idempotency-Key replay their first response (API-CONVENTIONS);
        # checkout demands one. Auth responses carry tokens and are never stored.
        return IdempotencyMiddleware(
            app_inside,
            store=container.idempotency,
            required_paths=REQUIRE_IDEMPOTENCY_KEY,
            # A new API key's response carries the key itself: never stored either.
            excluded_paths=(re.compile(r"^/v1/auth/"), re.compile(r"^/admin/api-keys")),
            ttl_s=settings.idempotency.ttl_s,
            lock_timeout_s=settings.idempotency.lock_timeout_s,
            hook=PrometheusIdempotencyMetrics(registry),
        )

    app.add_middleware(
        Edge,
        metrics=metrics,
        tracer=tracer,
        access_log=settings.http.access_log,
        trusted_proxies=TrustedProxies.parse(settings.network.trusted_proxies),
        forwarded_header=settings.network.forwarded_header,
        outer=outer,
        idempotency=idempotency,
        inner=inner,
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


_UNAVAILABLE = {
    **_problem("A dependency is unavailable (`/problems/dependency-unavailable`); retry after `Retry-After`"),
    "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait"}},
}


def _require_if_match(operation: dict[str, Any]) -> None:
    """`If-Match` is optional to FastAPI (its absence must reach the route to become 428, not 400), but
    a write needs it: the schema says required, so a client generated from it always sends one."""
    for parameter in operation.get("parameters", []):
        if parameter.get("in") == "header" and parameter.get("name", "").lower() == "if-match":
            parameter["required"] = True
            schema = parameter.get("schema", {})
            options = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
            if options:
                parameter["schema"] = {**options[0], "description": schema.get("description", "")}


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
    for path, path_item in schema.get("paths", {}).items():
        for method, operation in path_item.items():
            _require_if_match(operation)
            responses = operation.setdefault("responses", {})
            if "{" in path:
                # A path parameter outside its pattern names no resource: the router's 404.
                responses.setdefault("404", _problem("No such resource"))
            has_params = bool(operation.get("parameters"))
            has_body = "requestBody" in operation
            if "422" in responses or has_body:
                responses["422"] = _problem("Well-formed, but a rule or the current state refuses it")
            if has_params or has_body:
                responses.setdefault(
                    "400", _problem("The request breaks this schema (syntax, types, formats, ranges)")
                )
            if has_body or method in ("post", "put", "patch"):
                responses.setdefault("413", _problem("Request body too large"))
                responses.setdefault("408", _problem("The request body did not arrive in time"))
            responses.setdefault(
                "406", _problem("The Accept header names no media type this operation serves")
            )
            responses.setdefault("500", _problem("Unexpected error (carries only the request id)"))
            # Any route that touches the database can meet it down (ADR 0026).
            responses.setdefault("503", _UNAVAILABLE)
    document_cart_limits(schema, max_quantity=app.state.cart.limits.max_quantity)
    document_cache_headers(schema, app.state.cache_policies)
    document_rate_limits(schema)
    document_versioning(schema)
    routes = [route for router in ROUTERS for route in router.routes]
    document_access(schema, routes, api_key_header=app.state.api_key_header)
    app.openapi_schema = schema
    return schema
