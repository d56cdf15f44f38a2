"""Operator routes for partner API keys: issue, list, revoke (admin role, scope `users:write`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, cast

import orjson
from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from mercato.kit.auth import Principal
from mercato.kit.ids import parse_id
from mercato.kit.web import problem_responses, require_scopes
from mercato.kit.web.private import PRIVATE_HEADER_DOC, PrivateRoute
from mercato.shop.identity.api_keys import API_KEY_SCOPES, ApiKeyNotFound, ApiKeyService

__all__ = ["admin_router"]

admin_router = APIRouter(prefix="/admin/api-keys", tags=["admin", "identity"], route_class=PrivateRoute)

Admin = Annotated[Principal, Depends(require_scopes("users:write"))]
KeyIdPath = Annotated[str, Path(min_length=1, max_length=64)]
_MAX_EXPIRY_S = 400 * 24 * 3600


class ApiKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="Who or what the key is for.")
    scopes: list[str] = Field(
        default_factory=list,
        max_length=len(API_KEY_SCOPES),
        description=f"What the key may do; any of {sorted(API_KEY_SCOPES)}.",
    )
    expires_in_s: int | None = Field(
        default=None, ge=60, le=_MAX_EXPIRY_S, description="Seconds until the key stops working; null: never."
    )


class ApiKeyOut(BaseModel):
    id: str
    name: str
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class IssuedApiKeyOut(ApiKeyOut):
    key: str = Field(description="The key itself (send it as `X-API-Key`). Shown once: it is not stored.")


class ApiKeysOut(BaseModel):
    items: list[ApiKeyOut]


def _service(request: Request) -> ApiKeyService:
    return cast(ApiKeyService, request.app.state.api_keys)


Service = Annotated[ApiKeyService, Depends(_service)]


def _json(content: object, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content), status_code=status_code, media_type="application/json", headers=headers
    )


@admin_router.post(
    "",
    response_model=IssuedApiKeyOut,
    status_code=201,
    summary="Issue an API key (staff only)",
    description=(
        "Staff only (`users:write`). The response is the only time the key is shown; only a keyed "
        "hash is stored. Requests with the key are limited per key (the `api-key` rate-limit rule)."
    ),
    responses={
        **problem_responses(401, 403, 422),
        201: {
            "description": "Issued",
            "headers": {
                "Location": {"schema": {"type": "string"}, "description": "The key's listing entry"},
                **PRIVATE_HEADER_DOC,
            },
        },
    },
)
async def create_api_key(body: ApiKeyIn, service: Service, _admin: Admin) -> Response:
    issued = await service.create(body.name, body.scopes, expires_in_s=body.expires_in_s)
    content = {**issued.key.as_dict(), "key": issued.secret}
    return _json(content, 201, {"Location": f"/admin/api-keys/{issued.key.id}"})


@admin_router.get(
    "",
    response_model=ApiKeysOut,
    summary="List API keys (staff only)",
    description="Every key, revoked ones included, oldest first; never the keys themselves.",
    responses={**problem_responses(401, 403), 200: {"description": "Keys", "headers": PRIVATE_HEADER_DOC}},
)
async def list_api_keys(service: Service, _admin: Admin) -> Response:
    return _json({"items": [key.as_dict() for key in await service.list()]})


@admin_router.post(
    "/{key_id}/revoke",
    response_model=ApiKeyOut,
    summary="Revoke an API key (staff only)",
    description=(
        "The key is refused (401) from now on: at once in this process, in every other within "
        "`MERCATO_AUTH_API_KEY_CACHE_S`. Idempotent."
    ),
    responses={
        **problem_responses(401, 403, 404),
        200: {"description": "Revoked", "headers": PRIVATE_HEADER_DOC},
    },
)
async def revoke_api_key(key_id: KeyIdPath, service: Service, _admin: Admin) -> Response:
    parsed = parse_id(key_id)
    if parsed is None:
        raise ApiKeyNotFound(f"API key {key_id} not found")
    return _json((await service.revoke(parsed)).as_dict())
