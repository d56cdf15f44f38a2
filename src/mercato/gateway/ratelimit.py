"""The limiter at the edge: policies from a file, applied by an edge step before any route runs.

- Dimensions come from the request: the verified `X-API-Key` (its key id; a key that does not verify
  makes the request anonymous, and the API-key step then answers 401), `anonymous` (set only
  when the request has neither a verified key nor a validly signed bearer token), the bearer token's
  subject (verified here, but a bad token only means "no user": refusing it stays the route's job),
  the client address (as the request context resolved it: the socket peer, or the client a trusted
  proxy forwarded for, ADR 0019), `X-Tenant-ID`, the route template, and JSON body fields
  (`body.email` for login), read from a bounded buffer and replayed to the app unchanged.
- Probes and metrics (`/healthz`, `/readyz`, `/startupz`, `/metrics`) are never limited, whatever the file
  says: an orchestrator must always see the truth about a process.
- A limited route's responses carry `RateLimit-*` and `X-RateLimit-*` of the most restrictive rule; a
  refusal is a 429 `/problems/rate-limited` with `Retry-After`; a fail-closed refusal while the store is
  down is a 503 `/problems/dependency-unavailable` with `Retry-After` (the client did nothing wrong).
- `GET /v1/rate-limit/status` tells callers their standing per rule without consuming anything.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import orjson
from fastapi import APIRouter, FastAPI, Query, Request
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope

from mercato.config import RateLimitSettings
from mercato.gateway.api_keys import verified_api_key
from mercato.kit.auth import CredentialVerifier, InvalidToken, Principal, TokenCodec
from mercato.kit.clock import Clock
from mercato.kit.health import HealthRegistry
from mercato.kit.observability import request_id_var
from mercato.kit.ratelimit.metrics import PrometheusRateLimitMetrics
from mercato.kit.ratelimit.policy import (
    BODY_DIMENSION_PREFIX,
    LimiterPool,
    PolicyEnforcer,
    PolicyStore,
    Rule,
    Verdict,
    key_part,
)
from mercato.kit.web import problem_responses
from mercato.kit.web.problems import problem_response

if TYPE_CHECKING:
    from mercato.gateway.edge import Exchange

__all__ = [
    "ALWAYS_EXEMPT",
    "DEFAULT_POLICY_FILE",
    "DimensionResolver",
    "RateLimit",
    "RateLimiting",
    "install_rate_limiting",
    "router",
]

ALWAYS_EXEMPT = frozenset({"/healthz", "/readyz", "/startupz", "/metrics"})
DEFAULT_POLICY_FILE = Path(str(files("mercato.gateway").joinpath("ratelimit.toml")))
# Login bodies are tiny; a larger body is not parsed for dimensions (it still reaches the app).
_MAX_DIMENSION_BODY_BYTES = 16_384
_ROUTE_CACHE_SIZE = 4096


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _route_template(scope: Scope, path: str) -> str | None:
    """The template of the route that will serve this request (routing happens after the edge)."""
    app = scope.get("app")
    routes = getattr(getattr(app, "router", None), "routes", ())
    probe = {"type": "http", "method": scope["method"], "path": path, "root_path": "", "headers": []}
    return _match_routes(routes, probe)


def _match_routes(routes: Iterable[Any], probe: dict[str, Any]) -> str | None:
    partial = None
    for route in routes:
        match, child = route.matches(probe)
        if match is Match.NONE:
            continue
        template = getattr(route, "path", None)
        # Included routers (FastAPI) have no template of their own: the answer is one of theirs.
        nested = getattr(route, "effective_candidates", None)
        if not isinstance(template, str) and callable(nested):
            template = _match_routes(nested(), {**probe, **child})
        if match is Match.FULL and template:
            return str(template)
        if partial is None and template:
            partial = str(template)  # the path exists for another method: still that route's quota
    return partial


def _body_field(body: bytes | None, name: str) -> str | None:
    if not body:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = data.get(name) if isinstance(data, dict) else None
    # Case-insensitive, trimmed: "Ada@Example.com " and "ada@example.com" are one account, one quota.
    return value.strip().casefold() or None if isinstance(value, str) else None


class DimensionResolver:
    """Turns a request into the dimension values its rules ask for; each value only when needed."""

    def __init__(
        self,
        *,
        codec: TokenCodec,
        api_key_header: str,
        tenant_header: str,
        api_keys: CredentialVerifier | None = None,
    ) -> None:
        self._codec = codec
        self._verifier = api_keys
        self._api_key = api_key_header.lower().encode("latin-1")
        self._tenant = tenant_header.lower().encode("latin-1")
        # (method, path) -> template: a repeat request skips the regex walk over every route. Bounded,
        # because paths carry ids; the oldest entry goes first.
        self._routes: OrderedDict[tuple[str, str], str | None] = OrderedDict()

    def _route(self, scope: Scope, path: str) -> str | None:
        key = (scope["method"], path)
        if key in self._routes:
            return self._routes[key]
        template = _route_template(scope, path)
        self._routes[key] = template
        if len(self._routes) > _ROUTE_CACHE_SIZE:
            self._routes.popitem(last=False)
        return template

    def _user(self, scope: Scope) -> str | None:
        authorization = _header(scope, b"authorization")
        if not authorization or authorization[:7].lower() != "bearer ":
            return None
        try:
            return self._codec.verify(authorization[7:].strip()).subject
        except InvalidToken:
            return None  # an invalid token is "no user" here; the route answers 401 if it needs one

    async def _key_id(self, scope: Scope) -> str | None:
        """The verified key's id; None when no key is sent, or when it does not verify (then the
        request is anonymous here, and the API-key step answers 401 after the limiter)."""
        if self._verifier is None:
            return None
        found = await verified_api_key(scope, self._verifier, self._api_key)
        return found.token_id if isinstance(found, Principal) else None

    async def resolve(
        self, scope: Scope, dimensions: Iterable[str], *, body: bytes | None, path: str | None = None
    ) -> dict[str, str | None]:
        values: dict[str, str | None] = {}
        for dimension in dimensions:
            if dimension in values:
                continue
            if dimension == "api_key":
                values[dimension] = await self._key_id(scope)
            elif dimension == "anonymous":
                # Neither a verified API key nor a validly signed bearer token: "1", else no value.
                known = await self._key_id(scope) or self._user(scope)
                values[dimension] = None if known else "1"
            elif dimension == "user":
                values[dimension] = self._user(scope)
            elif dimension == "ip":
                client = scope.get("client")
                values[dimension] = client[0] if client else None
            elif dimension == "tenant":
                values[dimension] = _header(scope, self._tenant)
            elif dimension == "route":
                values[dimension] = self._route(scope, scope["path"] if path is None else path)
            elif dimension.startswith(BODY_DIMENSION_PREFIX):
                values[dimension] = _body_field(body, dimension.removeprefix(BODY_DIMENSION_PREFIX))
        return values


class _HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "mercato_ratelimit_requests_total",
            "Requests checked by the edge limiter, by the deciding rule and outcome.",
            ["rule", "outcome"],
            registry=registry,
        )
        self.reloads = Counter(
            "mercato_ratelimit_policy_reloads_total",
            "Policy file reloads: applied, or rejected (the previous policies stay in force).",
            ["outcome"],
            registry=registry,
        )
        self.seconds = Histogram(
            "mercato_ratelimit_check_seconds",
            "Time spent deciding one request (every applicable rule).",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25),
            registry=registry,
        )


@dataclass
class RateLimiting:
    """What the edge step and the status route share (on `app.state.rate_limiting`)."""

    enforcer: PolicyEnforcer
    resolver: DimensionResolver
    metrics: _HttpMetrics | None = None

    async def keyed(
        self, rules: list[Rule], scope: Scope, *, body: bytes | None, path: str | None = None
    ) -> list[tuple[Rule, str]]:
        needed = {d for rule in rules for d in rule.dimensions}
        values = await self.resolver.resolve(scope, needed, body=body, path=path) if needed else {}
        out = []
        for rule in rules:
            key = rule.key(values)
            if key is not None:
                out.append((rule, key))
        return out

    async def aclose(self) -> None:
        await self.enforcer.pool.aclose()


class RateLimit:
    """Edge step: every applicable rule must admit the request (429/503 otherwise); the headline rule's
    `RateLimit-*` headers go on the response."""

    def __init__(self, *, limiting: RateLimiting) -> None:
        self.limiting = limiting

    async def __call__(self, ex: Exchange) -> ASGIApp | None:
        scope = ex.scope
        if ex.path in ALWAYS_EXEMPT:
            return None
        limiting = self.limiting
        rules = limiting.enforcer.applicable(ex.method, ex.path)
        if not rules:
            return None
        started = time.perf_counter()
        body: bytes | None = None
        if any(rule.needs_body for rule in rules):
            body, ex.receive = await _buffer_body(ex.receive)
        keyed = await limiting.keyed(rules, scope, body=body)
        if not keyed:
            return None
        verdict = await limiting.enforcer.check(keyed)
        self._observe(verdict, time.perf_counter() - started)
        headline = verdict.headline
        assert headline is not None  # keyed is not empty
        if not verdict.allowed:
            return _refusal(verdict, headline.decision.headers(), scope)
        ex.added.extend(headline.decision.header_pairs())
        return None

    def _observe(self, verdict: Verdict, seconds: float) -> None:
        metrics = self.limiting.metrics
        headline = verdict.headline
        if metrics is None or headline is None:
            return
        metrics.seconds.observe(seconds)
        outcome = "limited" if not verdict.allowed else "allowed"
        if not verdict.allowed and headline.decision.degraded:
            outcome = "unavailable"
        metrics.requests.labels(headline.rule.name, outcome).inc()


async def _buffer_body(receive: Receive) -> tuple[bytes | None, Receive]:
    """Read the body (up to a bound) and return it with a `receive` that replays it to the app."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break  # a disconnect: replay it, the app will see it
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_DIMENSION_BODY_BYTES:
            chunks = []
            break  # too big to parse for a dimension; the rest streams through untouched
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks) if chunks else None

    async def replay() -> Message:
        if messages:
            return messages.pop(0)
        return await receive()

    return body, replay


def _refusal(verdict: Verdict, headers: dict[str, str], scope: Scope) -> Response:
    headline = verdict.headline
    assert headline is not None
    decision, rule = headline.decision, headline.rule
    retry_after = int(headers.get("Retry-After", "1"))
    if decision.degraded:
        return problem_response(
            status=503,
            slug="dependency-unavailable",
            title="Dependency unavailable",
            detail=f"the rate limiter's store is unavailable and rule '{rule.name}' fails closed; "
            f"retry after {retry_after} s",
            instance=scope["path"],
            request_id=request_id_var.get(),
            headers=headers,
            extensions={"retry_after_s": retry_after},
        )
    return problem_response(
        status=429,
        slug="rate-limited",
        title="Too many requests",
        detail=f"rate limit '{rule.name}' ({rule.limit}) exceeded; retry after {retry_after} s",
        instance=scope["path"],
        request_id=request_id_var.get(),
        headers=headers,
        extensions={"retry_after_s": retry_after, "rule": rule.name},
    )


# --- the status route ---------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", tags=["rate limits"])


class RuleStandingOut(BaseModel):
    rule: str = Field(description="The policy rule's name.")
    policy: str = Field(description="The limit and algorithm, e.g. `100/1s burst 200 token_bucket`.")
    dimensions: dict[str, str] = Field(description="The values identifying your quota (secrets hashed).")
    backend: str
    limit: int = Field(description="The quota (bucket capacity, or units per window).")
    remaining: int
    reset_after_s: float = Field(description="Seconds until the quota is full again if you send nothing.")
    retry_after_s: float = Field(description="Seconds until one more request would be admitted (0: now).")
    allowed: bool = Field(description="Would one more request be admitted now?")
    degraded: bool = Field(description="The store is unavailable: the answer comes from the rule's policy.")


class RateLimitStatusOut(BaseModel):
    method: str
    path: str | None = Field(description="The request asked about; null means every rule keyed on you.")
    rules: list[RuleStandingOut]


def _limiting(request: Request) -> RateLimiting | None:
    return cast(RateLimiting | None, getattr(request.app.state, "rate_limiting", None))


@router.get(
    "/rate-limit/status",
    response_model=RateLimitStatusOut,
    summary="Your standing under each rate-limit rule that applies to you (consumes nothing)",
    responses=problem_responses(400),
)
async def rate_limit_status(
    request: Request,
    path: Annotated[
        str | None,
        Query(
            max_length=512,
            pattern=r"^/",
            description="Ask about this request (e.g. `/v1/checkout`) instead of every rule keyed on you",
        ),
    ] = None,
    method: Annotated[str, Query(pattern=r"^[A-Za-z]{3,7}$")] = "GET",
) -> Response:
    limiting = _limiting(request)
    method = method.upper()
    if limiting is None:  # rate limiting disabled: nothing applies to anyone
        return _status_response({"method": method, "path": path, "rules": []})
    policies = limiting.enforcer.store.refresh()
    if path is not None:
        rules = [] if path in ALWAYS_EXEMPT else policies.applicable(method, path)
    else:
        # Without a request to ask about, a route or a body field cannot be known: those rules are left out.
        rules = [rule for rule in policies.rules if not rule.needs_body and "route" not in rule.dimensions]
    scope = request.scope
    needed = {d for rule in rules for d in rule.dimensions}
    values = await limiting.resolver.resolve(scope, needed, body=None, path=path)
    keyed = [(rule, key) for rule in rules if (key := rule.key(values)) is not None]
    verdict = await limiting.enforcer.standing(keyed)
    body = {
        "method": method,
        "path": path,
        "rules": [
            {
                "rule": item.rule.name,
                "policy": item.rule.describe(),
                "dimensions": {
                    d: key_part(d, str(values[d])) for d in item.rule.dimensions if values.get(d) is not None
                },
                "backend": item.backend,
                "limit": item.decision.limit,
                "remaining": item.decision.remaining,
                "reset_after_s": round(item.decision.reset_after_s, 3),
                "retry_after_s": round(item.decision.retry_after_s, 3),
                "allowed": item.decision.allowed,
                "degraded": item.decision.degraded,
            }
            for item in verdict.decisions
        ],
    }
    return _status_response(body)


def _status_response(body: dict[str, Any]) -> Response:
    # Per caller and changing by the request: never cached.
    return Response(
        orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "private, no-store"}
    )


# --- wiring ------------------------------------------------------------------------------------------------


def install_rate_limiting(
    app: FastAPI,
    *,
    settings: RateLimitSettings,
    codec: TokenCodec,
    health: HealthRegistry,
    registry: CollectorRegistry,
    clock: Clock,
    api_keys: CredentialVerifier | None = None,
) -> RateLimiting | None:
    """Build the limiter from settings, register its readiness check and route; the edge runs it
    (`RateLimit(limiting=...)`). Returns None when rate limiting is disabled; otherwise close it
    (`aclose`) at shutdown.
    """
    app.include_router(router)
    if not settings.enabled:
        return None
    metrics = _HttpMetrics(registry)

    def on_reload(ok: bool, _message: str) -> None:
        metrics.reloads.labels("applied" if ok else "rejected").inc()

    store = PolicyStore(
        settings.policy_file or DEFAULT_POLICY_FILE,
        check_interval_s=settings.reload_interval_s,
        clock=clock,
        on_reload=on_reload,
    )
    pool = LimiterPool(
        default_backend=settings.backend,
        redis_url=settings.redis_url,
        key_prefix=settings.key_prefix,
        socket_timeout_s=settings.socket_timeout_s,
        timeout_s=settings.timeout_s,
        failure_threshold=settings.failure_threshold,
        reset_timeout_s=settings.reset_timeout_s,
        clock=clock,
        metrics=PrometheusRateLimitMetrics(registry),
    )
    enforcer = PolicyEnforcer(store, pool)
    limiting = RateLimiting(
        enforcer=enforcer,
        resolver=DimensionResolver(
            codec=codec,
            api_key_header=settings.api_key_header,
            tenant_header=settings.tenant_header,
            api_keys=api_keys,
        ),
        metrics=metrics,
    )
    app.state.rate_limiting = limiting
    health.add_check("ratelimit", enforcer.readiness_check)
    return limiting


def document_rate_limits(schema: dict[str, Any]) -> None:
    """OpenAPI: every /v1 operation may answer 429 and carries the RateLimit headers when a rule applies.

    Which rules apply is decided by a file that changes at run time, so the document states the possibility
    on every versioned route rather than a list that could go stale.
    """
    optional = {"schema": {"type": "integer"}}
    rate_headers = {
        name: {**optional, "description": text}
        for name, text in (
            ("RateLimit-Limit", "The quota of the most restrictive rule that applies"),
            ("RateLimit-Remaining", "Requests left in that quota"),
            ("RateLimit-Reset", "Seconds until that quota is full again"),
            ("X-RateLimit-Limit", "Same as RateLimit-Limit"),
            ("X-RateLimit-Remaining", "Same as RateLimit-Remaining"),
            ("X-RateLimit-Reset", "Same as RateLimit-Reset"),
        )
    }
    too_many = problem_responses(429)[429]
    too_many.pop("model", None)
    too_many["description"] = "A rate-limit rule refused the request (`/problems/rate-limited`)"
    too_many["headers"] = {**too_many.get("headers", {}), **rate_headers}
    for path, path_item in schema.get("paths", {}).items():
        if not path.startswith("/v1/"):
            continue
        for operation in path_item.values():
            responses = operation.setdefault("responses", {})
            responses.setdefault("429", too_many)
            for status, response in responses.items():
                if str(status).startswith("2"):
                    response.setdefault("headers", {})
                    for name, header in rate_headers.items():
                        response["headers"].setdefault(name, header)
