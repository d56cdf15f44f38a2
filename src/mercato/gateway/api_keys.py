"""`X-API-Key` at the edge: verified once per request, refused with 401 when unknown or revoked.

The rate limiter and this edge step (after it) share one verification per request,
memoised in the ASGI scope's state. A key that does not verify is no identity at all: the limiter
charges the request to the caller's address as anonymous traffic (so sending made-up keys buys no
fresh bucket), then this step answers 401. A verified key's principal is left in the request
state, where `kit.web.security.authenticated` finds it when no bearer token is sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from starlette.types import ASGIApp, Scope

from mercato.kit.auth import CredentialVerifier, Principal
from mercato.kit.web.problems import problem_response
from mercato.kit.web.security import API_KEY_PRINCIPAL

if TYPE_CHECKING:
    from mercato.gateway.edge import Exchange

__all__ = ["INVALID_KEY", "ApiKeyCheck", "verified_api_key"]

_MEMO = "mercato.api_key"
# An orchestrator's probes answer whatever headers come with them.
_PROBES = frozenset({"/healthz", "/readyz", "/startupz", "/metrics"})
# The memo's value for "a key was sent and it does not verify" (None: no key sent).
INVALID_KEY: Final = "invalid"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def verified_api_key(scope: Scope, verifier: CredentialVerifier, header: bytes) -> Any:
    """The request's key principal, `INVALID_KEY`, or None when it sends no key (memoised per request)."""
    state: dict[str, Any] = scope.setdefault("state", {})
    if _MEMO in state:
        return state[_MEMO]
    raw = _header(scope, header)
    result: Principal | str | None = None
    if raw is not None:
        result = await verifier.authenticate(raw.strip()) or INVALID_KEY
    state[_MEMO] = result
    return result


class ApiKeyCheck:
    """Edge step: an unknown or revoked `X-API-Key` is a 401; a verified one is the request's principal."""

    def __init__(self, *, verifier: CredentialVerifier, header_name: str) -> None:
        self.verifier = verifier
        self.header = header_name.lower().encode("latin-1")

    async def __call__(self, ex: Exchange) -> ASGIApp | None:
        scope = ex.scope
        if ex.path in _PROBES:
            return None
        state = scope.get("state")
        if (state is None or _MEMO not in state) and ex.header(self.header) is None:
            return None  # no key sent, and the limiter did not look: nothing to verify or remember
        result = await verified_api_key(scope, self.verifier, self.header)
        if result == INVALID_KEY:
            return problem_response(
                status=401,
                slug="unauthenticated",
                title="Authentication required",
                detail="unknown, expired or revoked API key",
                instance=ex.path,
                request_id=ex.request_id,
                headers={"WWW-Authenticate": 'ApiKey realm="mercato"', "Cache-Control": "no-store"},
            )
        if result is not None:
            scope["state"][API_KEY_PRINCIPAL] = result
        return None
