"""The edge: one pure-ASGI callable running every per-request protection as an ordered list of steps.

It replaces a stack of a dozen middlewares (ADR 0054). Each of those re-scanned the headers, built a
closure around `send`, copied the response headers and awaited one more frame, on every request. Here:

- per-app work is done once (route tables, pre-encoded header names, metric children by label);
- each concern is a small step (`Step`): it reads the request from one shared `Exchange`, may answer it
  (a refusal: returns the ASGI response to send), may register a cleanup (`ex.defer`) and may add
  response headers (`ex.add_header`) or rewrite them (`ex.on_start`); nothing else;
- there is one `send` wrapper: on `http.response.start` it applies the steps' header work, innermost
  step first (as nested middlewares did), and adds `X-Request-ID`;
- the request context (request id, client address, span, RED metrics, access log, the last-resort
  500/503) is the runner itself: it wraps the steps in one `try`.

Steps run in two phases around idempotency: `outer` steps, then (for an unsafe request with an
`Idempotency-Key`) the kit's `IdempotencyMiddleware`, whose app is the `inner` steps and the router, so
a stored answer is replayed without running them, exactly as when idempotency was a layer of its own.
WebSocket and lifespan scopes pass straight through to the app.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mercato.gateway.errors import outage_response
from mercato.gateway.middleware import BodyRefused, refuse_body, with_client_address
from mercato.kit.clock import Clock, SystemClock
from mercato.kit.observability import HttpMetrics, get_logger, request_id_var
from mercato.kit.observability.loop_metrics import LoopCounter, LoopHistogram
from mercato.kit.privacy import network_prefix
from mercato.kit.resilience.deadline import DEADLINE_HEADER, deadline_scope, parse_deadline_header
from mercato.kit.resilience.deadline import Deadline as RequestDeadline
from mercato.kit.storage.outages import classify_outage
from mercato.kit.web.forwarded import X_FORWARDED_FOR, ForwardedHeader, TrustedProxies
from mercato.kit.web.problems import problem_response

__all__ = ["Deadline", "Edge", "Exchange", "HeaderHook", "Step", "exchange_of"]

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_UNMATCHED_ROUTE = "<unmatched>"
_X_REQUEST_ID = b"x-request-id"
_SCOPE_KEY = "mercato.exchange"
_UNKNOWN = object()
_NETWORKS_SIZE = 4096
_log = get_logger("mercato.http")


class _RequestIds:
    """Request ids: 64 random bits per process (drawn again in a forked child) then a counter, in 32 hex
    characters, as unique as `uuid4().hex` across processes and restarts without a `getrandom` system
    call per request. Correlation ids, not secrets: nothing is authorised by one."""

    __slots__ = ("count", "prefix")

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.count = int.from_bytes(os.urandom(4), "big")

    def next(self) -> str:
        self.count = count = self.count + 1
        return f"{self.prefix}{count & 0xFFFFFFFFFFFFFFFF:016x}"


_request_ids = _RequestIds()
os.register_at_fork(after_in_child=_request_ids.reseed)

# Rewrites the response's header list in place, given the status.
HeaderHook = Callable[[int, list[tuple[bytes, bytes]]], None]


class Exchange:
    """One request's shared state: what the steps read, and what they leave for the response."""

    __slots__ = (
        "_headers",
        "added",
        "cleanups",
        "hooks",
        "method",
        "path",
        "receive",
        "request_id",
        "route",
        "scope",
        "started",
        "status",
    )

    def __init__(self, scope: Scope, receive: Receive, request_id: str) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.request_id = request_id
        self.status = 500
        self.started = False
        # The template of the route that answered, when a step answered it (the router sets scope's).
        self.route: str | None = None
        self.added: list[tuple[bytes, bytes]] = []
        self.hooks: list[HeaderHook] = []
        self.cleanups: list[Callable[[], object]] = []
        self._headers: dict[bytes, str] | None = None

    def header(self, name: bytes) -> str | None:
        """The request header `name` (lower-case bytes); the headers are indexed once, on first ask."""
        headers = self._headers
        if headers is None:
            headers = {}
            for key, value in self.scope.get("headers", ()):
                # The first of repeated headers, as each middleware's own scan used to answer.
                if key not in headers:
                    headers[key] = value.decode("latin-1")
            self._headers = headers
        return headers.get(name)

    def headers(self, name: bytes) -> list[str]:
        """Every value of a repeated header (rare: forwarding chains, duplicate keys)."""
        return [value.decode("latin-1") for key, value in self.scope.get("headers", ()) if key == name]

    def add_header(self, name: bytes, value: bytes) -> None:
        self.added.append((name, value))

    def on_start(self, hook: HeaderHook) -> None:
        """Rewrite the response headers; hooks run innermost step first, after `add_header`'s."""
        self.hooks.append(hook)

    def defer(self, cleanup: Callable[[], object]) -> None:
        self.cleanups.append(cleanup)


class Step(Protocol):
    """One concern of the edge. Returns an ASGI app (a response) to answer the request, else None."""

    async def __call__(self, ex: Exchange) -> ASGIApp | None: ...


class _MetricChildren:
    """`HttpMetrics`' children by label values, resolved once per (method, route, status); recorded
    into without a lock (`record`: the edge runs on the event loop's thread)."""

    def __init__(self, metrics: HttpMetrics) -> None:
        self._metrics = metrics
        self._counters: dict[tuple[str, str, int], LoopCounter] = {}
        self._histograms: dict[tuple[str, str], LoopHistogram] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self._metrics.requests.labels(method, route, str(status))
        histogram = self._histograms.get(key[:2])
        if histogram is None:
            histogram = self._histograms[key[:2]] = self._metrics.latency.labels(method, route)
        counter.record()
        histogram.record(seconds)


def _route_template(scope: Scope, ex: Exchange) -> str:
    path = getattr(scope.get("route"), "path", None)
    return str(path) if path else (ex.route or _UNMATCHED_ROUTE)


class Edge:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: HttpMetrics,
        tracer: Tracer | None = None,
        access_log: bool = False,
        trusted_proxies: TrustedProxies | None = None,
        forwarded_header: ForwardedHeader = X_FORWARDED_FOR,
        outer: Sequence[Step] = (),
        idempotency: Callable[[ASGIApp], ASGIApp] | None = None,
        inner: Sequence[Step] = (),
    ) -> None:
        """`idempotency`: builds the idempotency layer around the inner phase (given as its app)."""
        self.app = app
        self.metrics = _MetricChildren(metrics)
        self.tracer = tracer
        self.access_log = access_log
        self.trusted_proxies = trusted_proxies or TrustedProxies()
        self.forwarded_header = forwarded_header
        self.outer = tuple(outer)
        self.inner = tuple(inner)
        self.idempotency: Any = idempotency(self._inner_phase) if idempotency is not None else None
        # Only unsafe methods can carry an Idempotency-Key the layer honours (kit's default methods).
        self.idempotency_methods = frozenset(getattr(self.idempotency, "methods", ("POST", "PATCH")))
        self._networks: dict[str | None, str | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for key, value in scope.get("headers", ()):
            if key == _X_REQUEST_ID:
                incoming = value.decode("latin-1")
                break
        request_id = incoming if incoming and _REQUEST_ID_OK.match(incoming) else _request_ids.next()
        token = request_id_var.set(request_id)
        peer = scope.get("client")
        scope = with_client_address(scope, self.trusted_proxies, self.forwarded_header)
        client = scope.get("client")
        # Every log line of this request names its client's network (never the address: ADR 0019), the
        # proxy's too when one spoke for it.
        log_context = {"client_net": self._network(client[0] if client else None)}
        if peer is not None and client is not peer:
            log_context["peer_net"] = self._network(peer[0])
        log_tokens = structlog.contextvars.bind_contextvars(**log_context)
        ex = Exchange(scope, receive, request_id)
        scope[_SCOPE_KEY] = ex
        start = time.perf_counter()
        method = ex.method
        span: Any = None
        otel_token = None
        if self.tracer is not None:
            carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
            parent = propagate.extract(carrier)
            span = self.tracer.start_span(
                method,
                context=parent,
                kind=SpanKind.SERVER,
                attributes={
                    "http.request.method": method,
                    "url.path": ex.path,
                    "mercato.request_id": request_id,
                },
            )
            otel_token = otel_context.attach(trace.set_span_in_context(span, parent))
        request_id_header = (_X_REQUEST_ID, request_id.encode("latin-1"))

        async def edge_send(message: Message) -> None:
            # The one wrapper: the steps' header work, innermost first, then the request id.
            if message["type"] == "http.response.start":
                ex.started = True
                status = ex.status = message["status"]
                headers = list(message.get("headers", ()))
                if ex.added:
                    headers.extend(ex.added)
                for hook in reversed(ex.hooks):
                    hook(status, headers)
                headers.append(request_id_header)
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self._outer_phase(ex, edge_send)
        except BodyRefused as refused:
            # Raised from the bounded `receive` where no handler saw it (a step reading the body).
            if ex.started:
                ex.status = 500
            else:
                await refuse_body(refused, scope, receive, edge_send)
        except Exception as exc:  # noqa: BLE001 - the last resort: an outage is a 503, anything else a 500
            outage = classify_outage(exc)
            if outage is not None:
                # A dependency is down (raised outside the routes, e.g. the idempotency claim): ADR 0026.
                _log.warning(
                    "dependency_unavailable",
                    path=ex.path,
                    method=method,
                    dependency=outage.dependency,
                    reason=outage.reason,
                    error=type(exc).__name__,
                )
                response = outage_response(outage, method=method, instance=ex.path, request_id=request_id)
            else:
                _log.exception("unhandled_error", path=ex.path, method=method)
                response = problem_response(
                    status=500,
                    slug="internal-error",
                    title="Internal error",
                    detail="An unexpected error occurred; quote the request id when reporting it.",
                    request_id=request_id,
                )
            if not ex.started:
                await response(scope, receive, edge_send)
            else:
                ex.status = 500  # the response was cut short: it counts as the server's failure
        finally:
            # The scope and its exchange refer to each other: unlinked here, both are freed by their
            # reference counts as the request ends. Left as a cycle, every request's objects (the
            # exchange, uvicorn's cycle, its task's context...) waited for the cycle collector, whose
            # young-generation passes then cost more than the rest of a cached read.
            scope.pop(_SCOPE_KEY, None)
            for cleanup in reversed(ex.cleanups):
                cleanup()
            elapsed = time.perf_counter() - start
            status = ex.status
            route = _route_template(scope, ex)
            self.metrics.observe(method, route, status, elapsed)
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

    def _network(self, address: str | None) -> str | None:
        """`network_prefix`, memoised: parsing an address costs more than the rest of the context."""
        networks = self._networks
        found = networks.get(address, _UNKNOWN)
        if found is _UNKNOWN:
            if len(networks) >= _NETWORKS_SIZE:
                networks.clear()  # bounded: many clients only cost the parse again
            found = networks[address] = network_prefix(address)
        return found  # type: ignore[return-value]

    async def _outer_phase(self, ex: Exchange, send: Send) -> None:
        for step in self.outer:
            answer = await step(ex)
            if answer is not None:
                await answer(ex.scope, ex.receive, send)
                return
        if self.idempotency is not None and ex.method in self.idempotency_methods:
            await self.idempotency(ex.scope, ex.receive, send)
        else:
            await self._run_inner(ex, ex.scope, send)

    async def _inner_phase(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex: Exchange = scope[_SCOPE_KEY]
        # Idempotency read the body to fingerprint it: from here on it is replayed from `receive`.
        ex.receive = receive
        await self._run_inner(ex, scope, send)

    async def _run_inner(self, ex: Exchange, scope: Scope, send: Send) -> None:
        # `ex.receive`, read again after each step: a step that reads the body and then leaves the
        # request to the router hands it on replayed there (gateway/fast_writes.py).
        for step in self.inner:
            answer = await step(ex)
            if answer is not None:
                await answer(scope, ex.receive, send)
                return
        await self.app(scope, ex.receive, send)


_DEADLINE_HEADER = DEADLINE_HEADER.lower().encode("latin-1")


class Deadline:
    """Edge step: an incoming `X-Request-Deadline` (capped at `max_timeout_s`), else `default_timeout_s`
    if set, bounds everything the request does (every provider call reads it); with neither, nothing is
    put in force (the inherited deadline, none, stays)."""

    def __init__(
        self,
        *,
        default_timeout_s: float | None = None,
        max_timeout_s: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        self.default_timeout_s = default_timeout_s
        self.max_timeout_s = max_timeout_s
        self.clock: Clock = clock or SystemClock()

    async def __call__(self, ex: Exchange) -> ASGIApp | None:
        raw = ex.header(_DEADLINE_HEADER)
        deadline = None
        if raw is not None:
            deadline = parse_deadline_header(raw, max_timeout_s=self.max_timeout_s, clock=self.clock)
        if deadline is None and self.default_timeout_s is not None:
            deadline = RequestDeadline.after(self.default_timeout_s, clock=self.clock)
        if deadline is not None:
            scope = deadline_scope(deadline=deadline)
            scope.__enter__()
            ex.defer(lambda: scope.__exit__(None, None, None))
        return None


def exchange_of(scope: Scope) -> Exchange | None:
    """The edge's state for this request (None outside the edge, e.g. in a unit test of a route)."""
    found = scope.get(_SCOPE_KEY)
    return found if isinstance(found, Exchange) else None
