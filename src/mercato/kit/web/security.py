"""Bearer-token (or API-key) authentication and scope checks as FastAPI dependencies.

A bearer token is verified (signature, claims, expiry), then put to the app's `TokenGuard` (on
`app.state.token_guard`): a revoked token, or one whose subject is gone, is refused like a forged one.
Without a bearer, a request whose `X-API-Key` the edge already verified (the principal it left in the
request state under `API_KEY_PRINCIPAL`) is that key.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mercato.kit.auth import InvalidToken, Principal, TokenCodec, TokenGuard
from mercato.kit.auth.keys import KeyLoader
from mercato.kit.errors import Forbidden, Unauthenticated
from mercato.kit.ids import parse_id
from mercato.kit.observability import request_id_var
from mercato.kit.privacy import AuditLog

__all__ = [
    "API_KEY_PRINCIPAL",
    "AUDIT_LOG",
    "TOKEN_GUARD",
    "InsufficientScope",
    "MissingCredentials",
    "authenticated",
    "principal_for",
    "require_scopes",
]

# Names on `app.state` / the request state that this module reads.
AUDIT_LOG = "audit_log"
TOKEN_GUARD = "token_guard"  # noqa: S105 - an attribute name, not a secret
API_KEY_PRINCIPAL = "api_key_principal"
# The signing keys' loader (ADR 0036): awaited before a verification, a no-op once the process has
# loaded them (the API's startup does); its reloads run in the background, never here.
TOKEN_KEYS = "signing_keys"  # noqa: S105 - an attribute name, not a secret

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
        key_principal: Principal | None = getattr(request.state, API_KEY_PRINCIPAL, None)
        if key_principal is not None:
            return key_principal
        raise MissingCredentials("missing bearer token")
    keys: KeyLoader | None = getattr(request.app.state, TOKEN_KEYS, None)
    if keys is not None:
        await keys.ensure_loaded()
    try:
        principal = _codec(request).verify(credentials.credentials)
        guard: TokenGuard | None = getattr(request.app.state, TOKEN_GUARD, None)
        if guard is not None:
            await guard.admit(principal)
    except InvalidToken as exc:
        raise MissingCredentials("invalid, expired or revoked access token") from exc
    request.state.principal = principal
    return principal


def require_scopes(*scopes: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that authenticates and then demands every scope in `scopes`. When the app keeps
    an audit log (`app.state.audit_log`) that wants these scopes, the access is recorded before the
    operation runs (kit/privacy/audit.py)."""
    needed = frozenset(scopes)

    async def dependency(
        request: Request, principal: Annotated[Principal, Depends(authenticated)]
    ) -> Principal:
        if not principal.has_scopes(*scopes):
            raise InsufficientScope("requires scope " + " ".join(scopes))
        audit: AuditLog | None = getattr(request.app.state, AUDIT_LOG, None)
        if audit is not None and audit.wants(needed):
            route = request.scope.get("route")
            template = getattr(route, "path", request.url.path)
            params = ",".join(f"{k}={v}" for k, v in sorted(request.path_params.items()))
            await audit.record(
                actor=principal.subject,
                action=request.method,
                resource=f"{template} {params}".strip(),
                scopes=needed,
                subject_id=_subject_of(request.path_params),
                request_id=request_id_var.get() or None,
            )
        return principal

    # Read by the OpenAPI post-processing, which marks routes needing staff scopes as such.
    dependency.required_scopes = frozenset(scopes)  # type: ignore[attr-defined]
    return dependency


async def principal_for(request: Request, dependency: Callable[..., Awaitable[Principal]]) -> Principal:
    """What `Depends(dependency)` (a `require_scopes` dependency) gives a route, outside FastAPI's
    dependency solving (the edge's answers to hot routes, gateway/fast_writes.py): the same bearer
    parsing, verification, session guard, scope check and audit, raising what they raise."""
    credentials = await _bearer(request)
    return await dependency(request, await authenticated(request, credentials))


def _subject_of(path_params: dict[str, Any]) -> uuid.UUID | None:
    """The person a staff action is about, when the route names one."""
    for name in ("customer_id", "user_id"):
        if name in path_params:
            return parse_id(str(path_params[name]))
    return None
