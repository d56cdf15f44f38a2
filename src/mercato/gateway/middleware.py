"""Pure ASGI middleware for the edge (no BaseHTTPMiddleware: it costs a task per request).

`RequestContextMiddleware` gives every request an id, its client address (the socket peer, or the
client a trusted proxy forwarded for: ADR 0019), a server span, RED metrics, an access log line and a
last-resort 500 that carries only the request id (or, when the error says a dependency is down, a 503:
ADR 0026). `BodyLimitMiddleware` refuses bodies over the configured size before they are read into
memory, and bodies that arrive too slowly (408, ADR 0028).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mercato.gateway.errors import outage_response
from mercato.kit.observability import HttpMetrics, get_logger, request_id_var
from mercato.kit.privacy import network_prefix
from mercato.kit.storage.outages import classify_outage
from mercato.kit.web.forwarded import X_FORWARDED_FOR, ForwardedHeader, TrustedProxies, resolve_client_address
from mercato.kit.web.problems import problem_response

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_UNMATCHED_ROUTE = "<unmatched>"
_log = get_logger("mercato.http")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _headers(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope.get("headers", ()) if key == name]


def _with_client_address(scope: Scope, trusted: TrustedProxies, header: ForwardedHeader) -> Scope:
    """The scope with `client` set to the resolved client, so every layer inside (the limiter, the
    idempotency scope, routes' `request.client`) sees one answer, computed once."""
    peer = scope.get("client")
    if not trusted:
        return scope  # trust nobody: the peer is the client, and the headers are not even read
    peer_host = peer[0] if peer else None
    client = resolve_client_address(
        peer_host, _headers(scope, header.encode("latin-1")), trusted=trusted, header=header
    )
    if client == peer_host or client is None:
        return scope
    # The port a proxy saw is not ours to know; 0 says "unknown" as uvicorn's proxy middleware does.
    return {**scope, "client": (client, 0)}


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else _UNMATCHED_ROUTE


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: HttpMetrics,
        tracer: Tracer | None,
        access_log: bool = False,
        trusted_proxies: TrustedProxies | None = None,
        forwarded_header: ForwardedHeader = X_FORWARDED_FOR,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.tracer = tracer
        self.access_log = access_log
        self.trusted_proxies = trusted_proxies or TrustedProxies()
        self.forwarded_header = forwarded_header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _REQUEST_ID_OK.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        peer = scope.get("client")
        scope = _with_client_address(scope, self.trusted_proxies, self.forwarded_header)
        client = scope.get("client")
        client_ip = client[0] if client else None
        # Every log line of this request names its client's network (never the address: ADR 0019); the
        # proxy's too when one spoke for it.
        log_context = {"client_net": network_prefix(client_ip)}
        if peer is not None and client is not peer:
            log_context["peer_net"] = network_prefix(peer[0])
        log_tokens = structlog.contextvars.bind_contextvars(**log_context)
        start = time.perf_counter()
        status = 500
        started = False
        method = scope["method"]
        span: Any = None
        otel_token = None
        if self.tracer is not None:
            carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
            parent = propagate.extract(carrier)
            span = self.tracer.start_span(
                f"{method}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes={
                    "http.request.method": method,
                    "url.path": scope["path"],
                    "mercato.request_id": request_id,
                },
            )
            otel_token = otel_context.attach(trace.set_span_in_context(span, parent))

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:  # noqa: BLE001 - the last resort: an outage is a 503, anything else a 500
            outage = classify_outage(exc)
            if outage is not None:
                # A dependency is down (raised outside the routes, e.g. the idempotency claim): ADR 0026.
                _log.warning(
                    "dependency_unavailable",
                    path=scope["path"],
                    method=method,
                    dependency=outage.dependency,
                    reason=outage.reason,
                    error=type(exc).__name__,
                )
                response = outage_response(
                    outage, method=method, instance=scope["path"], request_id=request_id
                )
            else:
                _log.exception("unhandled_error", path=scope["path"], method=method)
                response = problem_response(
                    status=500,
                    slug="internal-error",
                    title="Internal error",
                    detail="An unexpected error occurred; quote the request id when reporting it.",
                    request_id=request_id,
                )
            if not started:
                await response(scope, receive, send_wrapper)
            else:
                status = 500  # the response was cut short: it counts as the server's failure
        finally:
            elapsed = time.perf_counter() - start
            route = _route_template(scope)
            self.metrics.observe(method=method, route=route, status=status, seconds=elapsed)
            if span is not None:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                span.end()
                if otel_token is not None:
                    otel_context.detach(otel_token)
            if self.access_log or status >= 500:
                _log.info(
                    "http_request",
                    method=method,
                    route=route,
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                )
            structlog.contextvars.reset_contextvars(**log_tokens)
            request_id_var.reset(token)


class BodyRefused(StarletteHTTPException):
    """Raised from inside `receive`. An HTTPException on purpose: FastAPI's body parser re-raises those
    (any other exception there becomes a 400 "error parsing the body"), so the problem handler answers
    with the right status wherever the body was being read."""


class BodyTooLarge(BodyRefused):
    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(413, detail=f"request bodies are limited to {max_body_bytes} bytes", headers=_CLOSE)


class BodyReadTimeout(BodyRefused):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408, detail=f"the request body did not arrive within {timeout_s:g} s", headers=_CLOSE
        )


# The server must not keep reading (or waiting for) a body it refused: the connection closes after
# the answer. Without it uvicorn drains a declared 50 MB body before the next request, holding the
# connection as long as the client likes.
_CLOSE = {"Connection": "close"}


class BodyLimitMiddleware:
    """Refuses bodies over `max_body_bytes` (declared: at once, 413; chunked: as soon as the running
    total passes it, 413) and bodies that take longer than `body_read_timeout_s` to arrive from the
    first read on (408), both with `Connection: close`."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_read_timeout_s: float = 10.0) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout_s = body_read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._refuse(BodyTooLarge(self.max_body_bytes), scope, receive, send)
            return
        received = 0
        complete = False
        deadline: float | None = None
        started = False
        loop = asyncio.get_running_loop()

        async def limited_receive() -> Message:
            nonlocal received, complete, deadline
            if complete:
                return await receive()  # after the body only a disconnect comes: no deadline on it
            if deadline is None:
                deadline = loop.time() + self.body_read_timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyReadTimeout(self.body_read_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyRefused as refused:
            # Raised where no exception handler saw it (a middleware reading the body): answer here.
            if started:
                raise
            await self._refuse(refused, scope, receive, send)

    async def _refuse(self, refused: BodyRefused, scope: Scope, receive: Receive, send: Send) -> None:
        slug = "payload-too-large" if refused.status_code == 413 else "request-timeout"
        response = problem_response(
            status=refused.status_code,
            slug=slug,
            title="Request body too large" if refused.status_code == 413 else "Request timeout",
            detail=str(refused.detail),
            instance=scope["path"],
            request_id=request_id_var.get(),
            headers=dict(refused.headers or {}),
        )
        await response(scope, receive, send)
