"""Maps every error to an RFC 9457 problem: domain errors by kind, framework errors by status."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from mercato.kit.errors import (
    Conflict,
    DomainError,
    Forbidden,
    NotFound,
    PreconditionFailed,
    RuleViolated,
    Unauthenticated,
)
from mercato.kit.observability import current_request_id
from mercato.kit.resilience import BulkheadFull, CircuitOpen, DeadlineExceeded
from mercato.kit.storage.outages import OUTAGE_ERROR_TYPES, Outage, classify_outage
from mercato.kit.web.problems import problem_response

_STATUS_BY_KIND: list[tuple[type[DomainError], int]] = [
    (NotFound, 404),
    (Conflict, 409),
    (RuleViolated, 422),
    (Unauthenticated, 401),
    (Forbidden, 403),
    (PreconditionFailed, 412),
]

# Problems raised by the framework or the edge, not by a context: slug -> (title, description).
EDGE_PROBLEMS: dict[str, tuple[str, str]] = {
    "validation-error": (
        "Invalid request",
        "The request body, query or path failed validation; `errors` lists each field.",
    ),
    "bad-request": ("Bad request", "The request is malformed (for example the query string)."),
    "not-found": ("Not found", "No route matches this path."),
    "method-not-allowed": ("Method not allowed", "The route exists but not for this HTTP method."),
    "not-acceptable": (
        "Not acceptable",
        "The Accept header names no media type the operation serves; `detail` lists the ones it does.",
    ),
    "payload-too-large": ("Request body too large", "The request body exceeds the configured limit."),
    "request-timeout": (
        "Request timeout",
        "The request body did not arrive within the server's body-read timeout; the connection is closed.",
    ),
    "unsupported-media-type": ("Unsupported media type", "Send JSON with Content-Type: application/json."),
    "internal-error": ("Internal error", "An unexpected error; the body carries only the request id."),
    "dependency-unavailable": (
        "Dependency unavailable",
        "A backend the request needs (`dependency`: database, redis, broker, or a provider) is down or "
        "did not answer in time; retry after `Retry-After` seconds. For a write, `outcome: unknown` means "
        "it may have taken effect: retry with the same Idempotency-Key, which replays or re-runs it safely.",
    ),
    "rate-limited": (
        "Too many requests",
        "A rate-limit rule refused the request: wait `Retry-After` seconds. The `RateLimit-*` headers and "
        "GET /v1/rate-limit/status tell your standing.",
    ),
    "overloaded": ("Server overloaded", "The server is shedding load; retry after `Retry-After` seconds."),
    "deadline-exceeded": (
        "Deadline exceeded",
        "The request's deadline (X-Request-Deadline, or the server's own) passed before the work finished.",
    ),
}

_SLUG_BY_STATUS = {
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    408: "request-timeout",
    413: "payload-too-large",
    415: "unsupported-media-type",
    400: "bad-request",
    503: "dependency-unavailable",
}


def status_for(error: DomainError) -> int:
    for kind, status in _STATUS_BY_KIND:
        if isinstance(error, kind):
            return status
    return 422


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path


async def domain_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError)
    status = status_for(exc)
    extensions = dict(exc.extensions)
    errors = []
    field = extensions.pop("field", None)
    if field:
        errors.append({"field": str(field), "message": exc.detail})
    headers = {"WWW-Authenticate": 'Bearer realm="mercato"'} if status == 401 else None
    return problem_response(
        status=status,
        slug=exc.slug,
        title=exc.title,
        detail=exc.detail,
        instance=request.url.path,
        request_id=current_request_id(),
        errors=errors,
        headers=headers,
        extensions=extensions,
    )


async def validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field_path(err.get("loc", ())), "message": str(err.get("msg", "invalid"))}
        for err in exc.errors()
    ]
    # One rule (ADR 0028): a request that breaks the published contract (what the OpenAPI schema says:
    # JSON syntax, types, required fields, formats, ranges), wherever in the request, is 400; 422 is
    # kept for a request the schema accepts and the server's rules or state refuse (a domain error).
    return problem_response(
        status=400,
        slug="validation-error",
        title="Invalid request",
        detail=f"{len(errors)} field(s) failed validation",
        instance=request.url.path,
        request_id=current_request_id(),
        errors=errors,
    )


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    slug = _SLUG_BY_STATUS.get(exc.status_code, "bad-request" if exc.status_code < 500 else "internal-error")
    title = EDGE_PROBLEMS.get(slug, ("Error", ""))[0]
    detail = exc.detail if isinstance(exc.detail, str) and exc.status_code < 500 else ""
    return problem_response(
        status=exc.status_code,
        slug=slug,
        title=title,
        detail=detail,
        instance=request.url.path,
        request_id=current_request_id(),
        headers=dict(exc.headers) if exc.headers else None,
    )


async def resilience_error_handler(request: Request, exc: Exception) -> Response:
    """An open breaker or a full bulkhead is a 503 with Retry-After; a passed deadline a 504."""
    assert isinstance(exc, CircuitOpen | BulkheadFull | DeadlineExceeded)
    # Only the dependency's role name ("psp") reaches the client, never a host or an error text.
    about = f" (dependency {exc.dependency!r})" if exc.dependency else ""
    headers: dict[str, str] | None = None
    if isinstance(exc, DeadlineExceeded):
        status, slug = 504, "deadline-exceeded"
        detail = "the request deadline passed" + about
    else:
        # Retry once the breaker admits probes again; a full bulkhead drains within a second.
        retry_after_s = exc.retry_after_s if isinstance(exc, CircuitOpen) else 1.0
        status, slug = 503, "dependency-unavailable"
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
        detail = "a dependency is not accepting calls right now" + about
    return problem_response(
        status=status,
        slug=slug,
        title=EDGE_PROBLEMS[slug][0],
        detail=detail,
        instance=request.url.path,
        request_id=current_request_id(),
        headers=headers,
    )


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def outage_response(outage: Outage, *, method: str, instance: str, request_id: str) -> Response:
    """`503 /problems/dependency-unavailable` naming the dependency, with `Retry-After` (ADR 0026)."""
    extensions: dict[str, Any] = {"dependency": outage.dependency, "reason": outage.reason}
    detail = f"the {outage.dependency} is unavailable ({outage.reason}); retry later"
    if outage.outcome_unknown and method not in _SAFE_METHODS:
        extensions["outcome"] = "unknown"
        detail += "; the write may have taken effect: retry with the same Idempotency-Key"
    return problem_response(
        status=503,
        slug="dependency-unavailable",
        title=EDGE_PROBLEMS["dependency-unavailable"][0],
        detail=detail,
        instance=instance,
        request_id=request_id,
        headers={"Retry-After": str(max(1, math.ceil(outage.retry_after_s))), "Cache-Control": "no-store"},
        extensions=extensions,
    )


async def outage_error_handler(request: Request, exc: Exception) -> Response:
    """A driver error that says a dependency is down becomes a 503; anything else stays the 500 it is."""
    outage = classify_outage(exc)
    if outage is None:
        raise exc
    return outage_response(
        outage, method=request.method, instance=request.url.path, request_id=current_request_id()
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, domain_error_handler)
    # Raised in a route: answered here, inside the idempotency middleware (which then frees the key).
    # Raised outside the routes (an edge step): the edge (`gateway/edge.py`) asks the same classifier.
    for kind in OUTAGE_ERROR_TYPES:
        app.add_exception_handler(kind, outage_error_handler)  # type: ignore[arg-type]
    for kind in (CircuitOpen, BulkheadFull, DeadlineExceeded):
        app.add_exception_handler(kind, resilience_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
