"""Maps every error to an RFC 9457 problem: domain errors by kind, framework errors by status."""

from __future__ import annotations

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
    "payload-too-large": ("Request body too large", "The request body exceeds the configured limit."),
    "unsupported-media-type": ("Unsupported media type", "Send JSON with Content-Type: application/json."),
    "internal-error": ("Internal error", "An unexpected error; the body carries only the request id."),
    "dependency-unavailable": ("Dependency unavailable", "A required backend did not answer in time."),
}

_SLUG_BY_STATUS = {
    404: "not-found",
    405: "method-not-allowed",
    413: "payload-too-large",
    415: "unsupported-media-type",
    400: "bad-request",
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
    # A malformed query, path or header is a bad request; a well-formed body that breaks the
    # schema is unprocessable content (RFC 9110 §15.5.21).
    in_body = any(str(err.get("loc", ("",))[0]) == "body" for err in exc.errors())
    status = 422 if in_body else 400
    return problem_response(
        status=status,
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


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, domain_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
