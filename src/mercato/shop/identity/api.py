"""Identity HTTP routes: sign-up, token issuance and rotation, logout, and the caller's account."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, cast

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from mercato.kit.auth import InvalidToken, Principal, TokenCodec
from mercato.kit.web import authenticated, problem_responses
from mercato.kit.web.private import PRIVATE_HEADER_DOC, PrivateRoute
from mercato.shop.identity.model import (
    EMAIL_PATTERN,
    MAX_DISPLAY_NAME_LENGTH,
    MAX_EMAIL_LENGTH,
    MAX_PASSWORD_LENGTH,
    MAX_REFRESH_TOKEN_LENGTH,
    MIN_PASSWORD_LENGTH,
    Role,
    User,
)
from mercato.shop.identity.service import IdentityService, TokenPair

router = APIRouter(prefix="/v1", tags=["identity"], route_class=PrivateRoute)

# Tokens and per-user data must never land in a shared or browser cache (RFC 6749 §5.1):
# PrivateRoute sets the header on every response of this router, problems included.
_NO_STORE_DOC = PRIVATE_HEADER_DOC


class RegisterIn(BaseModel):
    # Python's `re` for the e-mail pattern's look-ahead (the local part's length), which Rust's lacks.
    model_config = ConfigDict(extra="forbid", regex_engine="python-re")

    email: str = Field(
        min_length=3, max_length=MAX_EMAIL_LENGTH, pattern=EMAIL_PATTERN, examples=["ada@example.com"]
    )
    password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=MAX_PASSWORD_LENGTH)
    display_name: str | None = Field(default=None, max_length=MAX_DISPLAY_NAME_LENGTH)


class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(min_length=1, max_length=MAX_EMAIL_LENGTH)
    # No minimum here: the policy is for new passwords; a short one simply does not match.
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)


class RefreshIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refresh_token: str = Field(min_length=1, max_length=MAX_REFRESH_TOKEN_LENGTH)


class TokenOut(BaseModel):
    access_token: str = Field(description="A JWT for `Authorization: Bearer`; short-lived.")
    refresh_token: str = Field(description="Opaque; single use: each refresh returns a new one.")
    token_type: str = Field(description="Always `bearer`.")
    expires_in: int = Field(description="Seconds until the access token expires.")


class UserOut(BaseModel):
    id: str
    email: str
    display_name: str
    role: Role
    scopes: list[str]
    created_at: datetime


def user_dict(user: User) -> dict[str, Any]:
    """The public view of an account. Built field by field so the password hash can never leak in."""
    return {
        "id": str(user.id),
        "email": user.email,
        "display_name": user.display_name,
        "role": user.role.value,
        "scopes": sorted(scope.value for scope in user.scopes),
        "created_at": user.created_at.isoformat().replace("+00:00", "Z"),
    }


def _tokens(pair: TokenPair) -> Response:
    body = {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "token_type": pair.token_type,
        "expires_in": pair.expires_in,
    }
    return Response(orjson.dumps(body), media_type="application/json")


def identity_service(request: Request) -> IdentityService:
    return cast(IdentityService, request.app.state.identity)


Service = Annotated[IdentityService, Depends(identity_service)]
_optional_bearer = HTTPBearer(auto_error=False, description="The access token to revoke with the login")
Caller = Annotated[Principal, Depends(authenticated)]


@router.post(
    "/auth/register",
    response_model=UserOut,
    status_code=201,
    summary="Create a customer account",
    description="Self-service sign-up; the account gets the customer role. Log in to get tokens.",
    responses={
        **problem_responses(409, 422),
        201: {
            "description": "Created",
            "headers": {
                "Location": {"schema": {"type": "string"}, "description": "`/v1/me`"},
                **_NO_STORE_DOC,
            },
        },
    },
)
async def register(body: RegisterIn, service: Service) -> Response:
    user = await service.register(body.email, body.password, body.display_name)
    return Response(
        orjson.dumps(user_dict(user)),
        status_code=201,
        media_type="application/json",
        headers={"Location": "/v1/me"},
    )


@router.post(
    "/auth/login",
    response_model=TokenOut,
    summary="Exchange e-mail and password for tokens",
    description="Starts a new refresh-token family. Unknown e-mail and wrong password fail identically.",
    responses={
        **problem_responses(401),
        200: {"description": "Tokens issued", "headers": _NO_STORE_DOC},
    },
)
async def login(body: LoginIn, service: Service) -> Response:
    return _tokens(await service.login(body.email, body.password))


@router.post(
    "/auth/refresh",
    response_model=TokenOut,
    summary="Rotate a refresh token",
    description=(
        "Returns a new access token and a new refresh token; the presented one stops working. "
        "Presenting an already-used refresh token revokes every token of its login."
    ),
    responses={
        **problem_responses(401),
        200: {"description": "Tokens issued", "headers": _NO_STORE_DOC},
    },
)
async def refresh(body: RefreshIn, service: Service) -> Response:
    return _tokens(await service.refresh(body.refresh_token))


@router.post(
    "/auth/logout",
    status_code=204,
    response_class=Response,
    summary="Revoke a login",
    description=(
        "Revokes the refresh token and every token rotated from the same login. Send the access token "
        "too (`Authorization: Bearer`): when it is the same account's, it is refused from then on, on "
        "every route and in every process, until it expires. Idempotent."
    ),
    responses={204: {"description": "Logged out (also when the token was already unusable)"}},
    # The bearer is optional here (the refresh token alone logs out): `{}` says so in OpenAPI.
    openapi_extra={"security": [{}]},
)
async def logout(
    body: RefreshIn,
    service: Service,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_optional_bearer)],
) -> Response:
    access = None
    if credentials is not None and credentials.scheme.lower() == "bearer":
        codec = cast(TokenCodec, request.app.state.token_codec)
        try:
            access = codec.verify(credentials.credentials)
        except InvalidToken:
            access = None  # nothing usable to revoke; the refresh token still is
    await service.logout(body.refresh_token, access=access)
    return Response(status_code=204)


@router.get(
    "/me",
    response_model=UserOut,
    summary="The caller's account",
    responses={
        **problem_responses(401),
        200: {"description": "The account", "headers": _NO_STORE_DOC},
    },
)
async def me(principal: Caller, service: Service) -> Response:
    user = await service.me(principal)
    return Response(orjson.dumps(user_dict(user)), media_type="application/json")
