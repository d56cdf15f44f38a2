"""JWT access tokens (RFC 7519) signed with HS256.

Verification pins the algorithm list, so `alg=none` and algorithm-confusion tokens are rejected,
and requires `exp`, `iat`, `sub`, `iss`, `aud` and `jti`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from mercato.kit.clock import Clock, SystemClock

ALGORITHM = "HS256"


class InvalidToken(Exception):
    """The token is malformed, tampered with, expired, or not for us."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the subject and what it may do."""

    subject: str
    roles: frozenset[str] = field(default_factory=frozenset)
    scopes: frozenset[str] = field(default_factory=frozenset)
    token_id: str = ""
    # When the credential stops being valid on its own (the token's `exp`); None for credentials
    # without one. A revocation needs to be remembered only until then.
    expires_at: datetime | None = None

    def has_scopes(self, *required: str) -> bool:
        return all(scope in self.scopes for scope in required)

    def has_role(self, role: str) -> bool:
        return role in self.roles


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_in: int
    expires_at: datetime


class TokenCodec:
    def __init__(
        self,
        *,
        secret: str,
        issuer: str,
        audience: str,
        access_ttl_s: int,
        clock: Clock | None = None,
        leeway_s: int = 5,
    ) -> None:
        if len(secret) < 32:
            raise ValueError("token secret must be at least 32 characters")
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        self._ttl_s = access_ttl_s
        self._clock = clock or SystemClock()
        self._leeway_s = leeway_s

    def issue(self, principal: Principal) -> IssuedToken:
        now = self._clock.now()
        expires_at = now + timedelta(seconds=self._ttl_s)
        claims: dict[str, Any] = {
            "sub": principal.subject,
            "iss": self._issuer,
            "aud": self._audience,
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int(expires_at.timestamp()),
            "jti": uuid.uuid4().hex,
            "roles": sorted(principal.roles),
            "scope": " ".join(sorted(principal.scopes)),
        }
        token = jwt.encode(claims, self._secret, algorithm=ALGORITHM)
        return IssuedToken(token=token, expires_in=self._ttl_s, expires_at=expires_at)

    def verify(self, token: str) -> Principal:
        if len(token) > 4096:
            raise InvalidToken("token too long")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway_s,
                # Time claims are checked below against the injected clock instead.
                options={
                    "require": ["exp", "iat", "nbf", "sub", "iss", "aud", "jti"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
            now = self._clock.now().timestamp()
            if float(claims["exp"]) + self._leeway_s < now:
                raise InvalidToken("token expired")
            if float(claims["nbf"]) - self._leeway_s > now:
                raise InvalidToken("token not yet valid")
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from exc
        roles = claims.get("roles", [])
        scope = claims.get("scope", "")
        if not isinstance(roles, list) or not isinstance(scope, str):
            raise InvalidToken("malformed claims")
        return Principal(
            subject=str(claims["sub"]),
            roles=frozenset(str(r) for r in roles),
            scopes=frozenset(scope.split()),
            token_id=str(claims["jti"]),
            expires_at=datetime.fromtimestamp(float(claims["exp"]), tz=UTC),
        )
