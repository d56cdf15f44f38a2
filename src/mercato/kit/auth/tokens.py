"""JWT access tokens (RFC 7519) signed with EdDSA (Ed25519) by the newest key of a `KeyRing`, named
in the header's `kid` (ADR 0036).

Verification pins the algorithm to EdDSA, so `alg=none` and algorithm-confusion tokens (HS256 keyed
with a public key) are rejected; it takes the key by `kid` from the in-process ring only (an unknown
or expired `kid` is refused, no statement is issued), and requires `exp`, `iat`, `sub`, `iss`, `aud`
and `jti`.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from mercato.kit.auth.keys import ALGORITHM, KeyRing, SigningKey
from mercato.kit.clock import Clock, SystemClock

# Verified tokens a codec remembers (least recently used first out): at most ~4 KB each.
VERIFIED_TOKENS_KEPT = 2048


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
        keys: KeyRing,
        issuer: str,
        audience: str,
        access_ttl_s: int,
        clock: Clock | None = None,
        leeway_s: int = 5,
    ) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._ttl_s = access_ttl_s
        self._clock = clock or SystemClock()
        self._leeway_s = leeway_s
        # Tokens whose signature, algorithm, issuer and audience were checked, with the key that
        # checked them: a client sends the same token on every request until it expires, and an
        # Ed25519 verification plus JSON decoding cost ~10 % of a checkout's API CPU. The key is
        # looked up again (retired: refused) and the time claims checked on every use.
        self._verified: OrderedDict[str, tuple[SigningKey, Principal, float, float]] = OrderedDict()

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
        key = self._keys.signer()
        if key is None or key.private is None:
            raise RuntimeError("no signing key loaded (SigningKeyStore.ready() was not awaited)")
        token = jwt.encode(claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid})
        return IssuedToken(token=token, expires_in=self._ttl_s, expires_at=expires_at)

    def verify(self, token: str) -> Principal:
        if len(token) > 4096:
            raise InvalidToken("token too long")
        now = self._clock.now()
        known = self._verified.get(token)
        if known is not None and self._keys.verifier(known[0].kid, now) is not known[0]:
            # The ring no longer holds that very key: retired, or the ring was reloaded (every
            # process reloads it periodically, handing out new key objects). Verify afresh: a
            # retired key is refused there, a reloaded one verifies again.
            self._verified.pop(token, None)
            known = None
        if known is None:
            known = self._verify_signed(token)
            self._verified[token] = known
            if len(self._verified) > VERIFIED_TOKENS_KEPT:
                with contextlib.suppress(KeyError):  # another thread took it first
                    self._verified.popitem(last=False)
        else:
            with contextlib.suppress(KeyError):
                self._verified.move_to_end(token)
        _, principal, expires, not_before = known
        moment = now.timestamp()
        if expires + self._leeway_s < moment:
            raise InvalidToken("token expired")
        if not_before - self._leeway_s > moment:
            raise InvalidToken("token not yet valid")
        return principal

    def _verify_signed(self, token: str) -> tuple[SigningKey, Principal, float, float]:
        """The signature and the claims that do not change with time: the key that verified the
        token, its principal, `exp` and `nbf`."""
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            if header.get("alg") != ALGORITHM or not isinstance(kid, str):
                raise InvalidToken("unexpected algorithm or no key id")
            key = self._keys.verifier(kid, self._clock.now())
            if key is None:
                raise InvalidToken("unknown or retired signing key")
            claims = jwt.decode(
                token,
                key.public,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway_s,
                # Time claims are checked by `verify` against the injected clock instead, every time.
                options={
                    "require": ["exp", "iat", "nbf", "sub", "iss", "aud", "jti"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from exc
        roles = claims.get("roles", [])
        scope = claims.get("scope", "")
        if not isinstance(roles, list) or not isinstance(scope, str):
            raise InvalidToken("malformed claims")
        principal = Principal(
            subject=str(claims["sub"]),
            roles=frozenset(str(r) for r in roles),
            scopes=frozenset(scope.split()),
            token_id=str(claims["jti"]),
            expires_at=datetime.fromtimestamp(float(claims["exp"]), tz=UTC),
        )
        return key, principal, float(claims["exp"]), float(claims["nbf"])
