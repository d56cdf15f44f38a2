"""Bearer-token authentication and scope checks as FastAPI dependencies."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mercato.kit.auth import InvalidToken, Principal, TokenCodec
from mercato.kit.errors import Forbidden, Unauthenticated

_bearer = HTTPBearer(auto_error=False, description="An access token from POST /v1/auth/login")


class MissingCredentials(Unauthenticated):
    slug = "unauthenticated"
    title = "Authentication required"
    description = "The request needs a valid bearer access token (Authorization: Bearer <token>)."


class InsufficientScope(Forbidden):
    slug = "forbidden"
    title = "Not allowed"
    description = "The caller is authenticated but lacks a role or scope this operation requires."


def _codec(request: Request) -> TokenCodec:
    codec: TokenCodec = request.app.state.token_codec
    return codec


async def authenticated(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise MissingCredentials("missing bearer token")
    try:
        principal = _codec(request).verify(credentials.credentials)
    except InvalidToken as exc:
        raise MissingCredentials("invalid or expired access token") from exc
    request.state.principal = principal
    return principal


def require_scopes(*scopes: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that authenticates and then demands every scope in `scopes`."""

    async def dependency(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if not principal.has_scopes(*scopes):
            raise InsufficientScope("requires scope " + " ".join(scopes))
        return principal

    return dependency
