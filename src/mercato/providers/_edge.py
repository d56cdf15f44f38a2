"""What both simulators share at the HTTP edge: problems, request ids, metrics and fault injection.

The edge middleware is the outermost ASGI layer (outside Starlette's error middleware) for one reason:
to make a "lost response" real it needs the server's own `send`, whose owner holds the TCP transport.

It also honours the caller's deadline (`X-Request-Deadline`, remaining milliseconds; API-CONVENTIONS):
a `/v1/` request that arrives with no time left is answered `504 /problems/deadline-exceeded` without
running, and one whose injected latency outlasts its deadline is cut there with the same answer, the
operation not applied. Work nobody waits for any more is never done (the caller has already given up
or retried; doing it anyway only adds load and, for a write, an effect the caller cannot know of).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mercato.kit.observability import (
    HttpMetrics,
    context_from,
    fastapi_native_tracing_off,
    get_logger,
    register_process_collectors,
    request_id_var,
    tracer,
)
from mercato.kit.resilience import DEADLINE_HEADER, Deadline, parse_deadline_header
from mercato.kit.web.bodies import read_body, replaying
from mercato.kit.web.problems import problem_response
from mercato.providers.faults import FaultDecision, FaultInjector, FaultKind, FaultSettings

__all__ = [
    "DEADLINE_STATE_KEY",
    "FAULT_LATENCY_STATE_KEY",
    "FastHandler",
    "ProviderApp",
    "ProviderMetrics",
    "ProviderProblem",
    "ResponseLost",
    "add_common_routes",
]

FAULT_LATENCY_STATE_KEY = "mercato_fault_latency_s"
DEADLINE_STATE_KEY = "mercato_request_deadline"
_DEADLINE_KEY = DEADLINE_HEADER.lower().encode("latin-1")
# A caller may not pin a simulated operation for longer than this, whatever its header says.
_MAX_DEADLINE_S = 600.0
_TRACE_KEYS = (b"traceparent", b"tracestate")
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_log = get_logger("mercato.providers")


class ProviderProblem(Exception):
    """A business or protocol rejection, rendered as RFC 9457 problem+json."""

    def __init__(
        self, status: int, slug: str, title: str, detail: str = "", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = headers

    def body(self, instance: str) -> dict[str, Any]:
        return {
            "type": f"/problems/{self.slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            "request_id": request_id_var.get(),
            "errors": [],
        }

    def response(self, instance: str) -> Response:
        return problem_response(
            status=self.status,
            slug=self.slug,
            title=self.title,
            detail=self.detail,
            instance=instance,
            request_id=request_id_var.get(),
            headers=self.headers,
        )


class ResponseLost(Exception):
    """Raised where no TCP transport can be dropped (in-process ASGI): the effect was applied."""


class ProviderMetrics:
    """RED metrics per route template plus every received request by the fault injected into it."""

    def __init__(self, registry: CollectorRegistry, provider: str) -> None:
        self.registry = registry
        self.provider = provider
        self.http = HttpMetrics(registry)
        register_process_collectors(registry)
        self.received = Counter(
            "mercato_provider_requests_received_total",
            "Requests the simulated provider received, by route template and injected fault kind.",
            ["provider", "method", "route", "fault"],
            registry=registry,
        )

    def count_received(self, *, method: str, route: str, fault: FaultKind) -> None:
        self.received.labels(self.provider, method, route, fault.value).inc()


# A hot operation answered below the framework (ADR 0060): given the scope, the whole request body
# and the path's parameters, its response, or None to let the FastAPI route answer instead (the
# body is replayed to it), which is how every error the route's validation gives stays its own.
FastHandler = Callable[[Scope, bytes, dict[str, str]], Awaitable[Response | None]]
_FAST_BODY_MAX = 64 * 1024


@dataclass(frozen=True, slots=True)
class _FastRoute:
    template: str
    pattern: re.Pattern[str]
    handler: FastHandler


def _fast_route(app: ProviderApp, scope: Scope) -> tuple[_FastRoute, dict[str, str]] | None:
    if scope["method"] != "POST":
        return None
    path = str(scope["path"])
    for route in app.fast_posts:
        found = route.pattern.fullmatch(path)
        if found is not None:
            return route, found.groupdict()
    return None


def _route_template(app: FastAPI, scope: Scope) -> str:
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", "<unmatched>"))
    return "<unmatched>"


def _is_business(scope: Scope) -> bool:
    # Faults hit the simulated operations only; reads (ledger, shipment lists) are the tests' oracle and
    # admin/health/metrics must keep working while the provider is "down".
    return scope["method"] == "POST" and str(scope["path"]).startswith("/v1/")


def _is_lookup(scope: Scope) -> bool:
    return scope["method"] == "GET" and str(scope["path"]).startswith("/v1/")


def _deadline(scope: Scope, injector: FaultInjector) -> Deadline | None:
    """The caller's deadline on the injector's clock, for `/v1/` routes (never probes or admin)."""
    if not str(scope["path"]).startswith("/v1/"):
        return None
    for key, value in scope.get("headers", ()):
        if key == _DEADLINE_KEY:
            return parse_deadline_header(
                value.decode("latin-1"), max_timeout_s=_MAX_DEADLINE_S, clock=injector.clock
            )
    return None


def deadline_exceeded() -> ProviderProblem:
    return ProviderProblem(
        504,
        "deadline-exceeded",
        "Deadline exceeded",
        "the caller's X-Request-Deadline passed before the operation ran; it was not applied",
    )


async def sleep_within(deadline: Deadline | None, delay_s: float) -> bool:
    """Sleep `delay_s`, or only until `deadline`; False when the deadline passed first."""
    if deadline is None:
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        return True
    remaining_s = deadline.remaining_s()
    if delay_s >= remaining_s:
        await asyncio.sleep(remaining_s)
        return False
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    return not deadline.expired


async def _drop_connection(send: Send) -> None:
    """Close the TCP connection without a byte of response, or raise where there is none (ASGI tests)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None or not hasattr(transport, "abort"):
        raise ResponseLost("the response was dropped after the operation was applied")
    transport.abort()
    # Let the server see the connection go (its `connection_lost` marks the request disconnected), so it
    # does not try to write its own 500 into the dead socket when we return without a response.
    for _ in range(3):
        await asyncio.sleep(0)


async def _hang(receive: Receive, max_s: float) -> None:
    """Never answer: wait for the client to give up (or `max_s`; shutdown cancels the task)."""

    async def until_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(until_disconnect(), timeout=max_s)
    except TimeoutError:
        return


class _EdgeMiddleware:
    def __init__(self, app: ASGIApp, *, owner: ProviderApp) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        owner = self.owner
        incoming = next(
            (v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), ""
        )
        request_id = incoming if _REQUEST_ID_OK.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        method = str(scope["method"])
        fast = _fast_route(owner, scope)
        route = fast[0].template if fast is not None else _route_template(owner, scope)
        decision = owner.injector.decide() if _is_business(scope) else FaultDecision(kind=FaultKind.NONE)
        owner.metrics.count_received(method=method, route=route, fault=decision.kind)
        start = time.perf_counter()
        status = 0
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
                message = {**message, "headers": headers}
            await send(message)

        parent = context_from(
            {
                k.decode("latin-1"): v.decode("latin-1")
                for k, v in scope.get("headers", ())
                if k in _TRACE_KEYS
            }
        )
        span = (
            None
            if parent is None
            else tracer().start_span(
                f"{method} {route}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes={
                    "http.request.method": method,
                    "http.route": route,
                    "mercato.provider": owner.metrics.provider,
                    "mercato.fault": decision.kind.value,
                },
            )
        )
        span_token = None if span is None else otel_context.attach(trace.set_span_in_context(span))
        try:
            await self._dispatch(scope, receive, send, send_with_id, decision, fast)
        except ResponseLost:
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, "response lost (injected)"))
            raise
        except Exception:  # noqa: BLE001 - the last resort: log it, answer 500 with the request id only
            _log.exception("provider_unhandled_error", path=scope["path"], method=method)
            if not started:
                await problem_response(
                    status=500,
                    slug="internal-error",
                    title="Internal error",
                    detail="An unexpected error occurred; quote the request id when reporting it.",
                    request_id=request_id,
                )(scope, receive, send_with_id)
        finally:
            owner.metrics.http.observe(
                method=method, route=route, status=status, seconds=time.perf_counter() - start
            )
            request_id_var.reset(token)
            if span is not None:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                span.end()
            if span_token is not None:
                otel_context.detach(span_token)

    async def _dispatch(
        self,
        scope: Scope,
        receive: Receive,
        raw_send: Send,
        send: Send,
        decision: FaultDecision,
        fast: tuple[_FastRoute, dict[str, str]] | None = None,
    ) -> None:
        kind = decision.kind
        deadline = _deadline(scope, self.owner.injector)
        if deadline is not None:
            if deadline.expired:
                await deadline_exceeded().response(str(scope["path"]))(scope, receive, send)
                return
            scope.setdefault("state", {})[DEADLINE_STATE_KEY] = deadline
        if _is_lookup(scope) and not await sleep_within(
            deadline, self.owner.injector.sample_read_latency_s()
        ):
            await deadline_exceeded().response(str(scope["path"]))(scope, receive, send)
            return
        if kind in (FaultKind.OUTAGE, FaultKind.ERROR):
            if not await sleep_within(deadline, decision.latency_s):
                await deadline_exceeded().response(str(scope["path"]))(scope, receive, send)
                return
            status = decision.status or 500
            headers = {"Retry-After": str(decision.retry_after_s)} if decision.retry_after_s else None
            slug, title = (
                ("provider-outage", "Provider outage")
                if kind is FaultKind.OUTAGE
                else ("injected-error", "Injected provider error")
            )
            await problem_response(
                status=status,
                slug=slug,
                title=title,
                detail="simulated failure; the operation was not applied",
                instance=str(scope["path"]),
                request_id=request_id_var.get(),
                headers=headers,
            )(scope, receive, send)
            return
        if kind is FaultKind.HANG:
            await _hang(receive, self.owner.injector.settings.hang_max_s)
            await _drop_connection(raw_send)
            return
        # The handler sleeps this long while holding the idempotency key, like a provider waiting on a
        # card network, so a concurrent retry with the same key meets the in-flight record (409).
        scope.setdefault("state", {})[FAULT_LATENCY_STATE_KEY] = decision.latency_s
        if kind is FaultKind.LOST_RESPONSE:

            async def discard(message: Message) -> None:
                return None

            await self._app(scope, receive, discard, fast)
            await _drop_connection(raw_send)
            return
        await self._app(scope, receive, send, fast)

    async def _app(
        self, scope: Scope, receive: Receive, send: Send, fast: tuple[_FastRoute, dict[str, str]] | None
    ) -> None:
        """The framework's route, or the operation's fast handler when it has one and takes the request."""
        if fast is None:
            await self.app(scope, receive, send)
            return
        body, complete = await read_body(receive)
        response: Response | None = None
        if complete and len(body) <= _FAST_BODY_MAX:
            try:
                response = await fast[0].handler(scope, body, fast[1])
            except ProviderProblem as problem:
                response = problem.response(str(scope["path"]))
        if response is None:
            await self.app(scope, replaying(body, receive), send)
            return
        await response(scope, receive, send)


class ProviderApp(FastAPI):
    """A FastAPI app whose outermost layer is the provider edge (request id, metrics, faults)."""

    def __init__(self, *, provider: str, injector: FaultInjector, registry: CollectorRegistry, **kwargs: Any):
        super().__init__(**{**fastapi_native_tracing_off(), **kwargs})
        self.provider = provider
        self.injector = injector
        self.metrics = ProviderMetrics(registry, provider)
        self.fast_posts: list[_FastRoute] = []
        _install_problem_handlers(self)

    def add_fast_post(self, template: str, handler: FastHandler) -> None:
        """Answer `POST template` (a route the app also declares, for its schema and its errors)
        with `handler` below the framework's route stack."""
        pattern = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(template))
        self.fast_posts.append(_FastRoute(template, re.compile(pattern), handler))

    def build_middleware_stack(self) -> ASGIApp:
        return _EdgeMiddleware(super().build_middleware_stack(), owner=self)


def latency_of(request: Request) -> float:
    """The latency the edge drew for this request (0 outside a faulted business call)."""
    return float(request.scope.get("state", {}).get(FAULT_LATENCY_STATE_KEY, 0.0))


def deadline_of(request: Request) -> Deadline | None:
    """The caller's deadline for this request, if it sent one."""
    deadline = request.scope.get("state", {}).get(DEADLINE_STATE_KEY)
    return deadline if isinstance(deadline, Deadline) else None


def _install_problem_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProviderProblem)
        return exc.response(request.url.path)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"field": ".".join(str(p) for p in err.get("loc", ())), "message": str(err.get("msg", ""))}
            for err in exc.errors()
        ]
        # A body that is not JSON, or a bad query/path parameter, is malformed (400); a well-formed body
        # that breaks the schema is 422 (the project's ADR 0005).
        malformed = any(
            err.get("type") == "json_invalid" or (err.get("loc") or ("",))[0] in ("query", "path")
            for err in exc.errors()
        )
        return problem_response(
            status=400 if malformed else 422,
            slug="malformed-request" if malformed else "validation-error",
            title="Malformed request" if malformed else "Invalid request",
            detail="the request does not match the operation's schema",
            instance=request.url.path,
            request_id=request_id_var.get(),
            errors=errors,
        )

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return problem_response(
            status=exc.status_code,
            slug=slug,
            detail=str(exc.detail),
            instance=request.url.path,
            request_id=request_id_var.get(),
            headers=dict(exc.headers) if exc.headers else None,
        )

    app.add_exception_handler(ProviderProblem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


class FaultsView(FaultSettings):
    """The settings as applied, plus what they mean right now."""

    outage_active: bool = False
    outage_remaining_s: float = 0.0
    applied_s_ago: float = 0.0


def add_common_routes(app: ProviderApp, *, ready: Callable[[], Awaitable[None]]) -> None:
    """`/healthz`, `/metrics` and `GET/PUT /admin/faults`: never faulted, never idempotency-keyed."""

    def view() -> FaultsView:
        injector = app.injector
        remaining = injector.outage_remaining_s()
        return FaultsView(
            **injector.settings.model_dump(),
            outage_active=remaining > 0,
            outage_remaining_s=round(remaining, 3),
            applied_s_ago=round(injector.elapsed_s(), 3),
        )

    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, str]:
        await ready()
        return {"status": "ok"}

    @app.get("/metrics", tags=["probes"], response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(app.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/faults", tags=["admin"])
    async def get_faults() -> FaultsView:
        return view()

    @app.put("/admin/faults", tags=["admin"])
    async def put_faults(settings: FaultSettings) -> FaultsView:
        app.injector.update(settings)
        _log.info("provider_faults_changed", provider=app.provider, **settings.model_dump(mode="json"))
        return view()
