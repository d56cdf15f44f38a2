"""RFC 9457 problem details: the one error shape every route returns."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from pydantic import BaseModel, Field
from starlette.responses import Response

PROBLEM_MEDIA_TYPE = "application/problem+json"


class FieldError(BaseModel):
    field: str = Field(description="Where the bad value is, e.g. `body.items[0].quantity`.")
    message: str


class ProblemDetails(BaseModel):
    type: str = Field(description="A stable URI naming the kind of problem; GET it for a description.")
    title: str
    status: int
    detail: str = ""
    instance: str = ""
    request_id: str = ""
    errors: list[FieldError] = Field(default_factory=list)


def problem_type_uri(slug: str) -> str:
    return f"/problems/{slug}"


def problem_response(
    *,
    status: int,
    slug: str,
    title: str | None = None,
    detail: str = "",
    instance: str = "",
    request_id: str = "",
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    extensions: dict[str, Any] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": problem_type_uri(slug),
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": instance,
        "request_id": request_id,
        "errors": errors or [],
    }
    if extensions:
        for key, value in extensions.items():
            body.setdefault(key, value)
    return Response(
        content=orjson.dumps(body),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


_DESCRIPTIONS = {
    400: "Bad request",
    401: "Missing or invalid credentials",
    403: "Not allowed for this caller",
    404: "Not found",
    409: "Conflict with the current state",
    412: "Precondition failed",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Invalid request",
    428: "Precondition required",
    429: "Too many requests",
    503: "Service unavailable",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries documenting problem bodies for the given statuses.

    Every route also gets 400, 413, 422 and 500 from the gateway, documented globally.
    """
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "description": _DESCRIPTIONS.get(status, HTTPStatus(status).phrase),
            "model": ProblemDetails,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}},
        }
        if status == 401:
            entry["headers"] = {
                "WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer challenge"}
            }
        if status in (429, 503):
            entry["headers"] = {
                "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait"}
            }
        out[status] = entry
    return out
