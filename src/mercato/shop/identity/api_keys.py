"""Partner API keys: issued by an operator, stored as a keyed hash, scoped, revocable.

A key is `mk_<prefix>_<secret>` (the prefix is shown in listings; the whole key only once, at
creation). The table holds HMAC-SHA256(key) under a server-side key derived from the auth secret, so
a leaked table gives neither a usable key nor hashes an attacker could test guesses against.

`authenticate` is on the request path of every request carrying `X-API-Key`: answers are cached
per key hash for `cache_ttl_s`, so a revocation reaches every process within that bound (and the
revoking process at once). Unknown keys are cached too (bounded), so rotating made-up keys costs
one lookup each, and each such request is charged to the caller's address by the edge limiter.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update

from mercato.kit.auth import Principal
from mercato.kit.clock import Clock
from mercato.kit.errors import NotFound, RuleViolated
from mercato.kit.ids import new_id
from mercato.kit.storage import Database
from mercato.shop.identity.contracts import Scope
from mercato.shop.identity.tables import api_keys

__all__ = [
    "API_KEY_ROLE",
    "API_KEY_SCOPES",
    "ApiKey",
    "ApiKeyNotFound",
    "ApiKeyService",
    "InvalidApiKeyRequest",
    "IssuedApiKey",
]

API_KEY_ROLE = "api_key"
# What a key may be granted: anything but minting credentials (users:write).
API_KEY_SCOPES = frozenset(scope.value for scope in Scope) - {Scope.USERS_WRITE.value}
_KEY_PREFIX = "mk_"
_MAX_KEY_LENGTH = 128


class ApiKeyNotFound(NotFound):
    slug = "api-key-not-found"
    title = "API key not found"
    description = "No API key with this id exists."


class InvalidApiKeyRequest(RuleViolated):
    slug = "invalid-api-key-request"
    title = "Invalid API key request"
    description = "The scopes or expiry asked for an API key are not allowed."


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: uuid.UUID
    name: str
    prefix: str
    scopes: frozenset[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def principal(self) -> Principal:
        """Who a request with this key is: the key itself, with the key's scopes only."""
        return Principal(
            subject=f"api-key:{self.id}",
            roles=frozenset({API_KEY_ROLE}),
            scopes=self.scopes,
            token_id=str(self.id),
            expires_at=self.expires_at,
        )

    def as_dict(self) -> dict[str, Any]:
        def ts(moment: datetime | None) -> str | None:
            return None if moment is None else moment.isoformat().replace("+00:00", "Z")

        return {
            "id": str(self.id),
            "name": self.name,
            "prefix": self.prefix,
            "scopes": sorted(self.scopes),
            "created_at": ts(self.created_at),
            "expires_at": ts(self.expires_at),
            "revoked_at": ts(self.revoked_at),
        }


@dataclass(frozen=True, slots=True)
class IssuedApiKey:
    key: ApiKey
    secret: str  # the whole key: shown once, never stored


def _row(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        scopes=frozenset(row.scopes.split()),
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


class ApiKeyService:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        hash_key: bytes,
        cache_ttl_s: float = 5.0,
        max_cached: int = 10_000,
    ) -> None:
        if len(hash_key) < 32:
            raise ValueError("the API key hashing key must be at least 32 bytes")
        self._db = db
        self._clock = clock
        self._hash_key = hash_key
        self._ttl_s = cache_ttl_s
        self._max_cached = max_cached
        self._cache: OrderedDict[str, tuple[ApiKey | None, float]] = OrderedDict()

    @staticmethod
    def derive_hash_key(secret: str) -> bytes:
        """A key for hashing API keys, separate from (but derived from) the token-signing secret."""
        return hmac.new(secret.encode("utf-8"), b"mercato api-key hashing v1", hashlib.sha256).digest()

    def _digest(self, raw: str) -> str:
        return hmac.new(self._hash_key, raw.encode("utf-8"), hashlib.sha256).hexdigest()

    async def create(self, name: str, scopes: list[str], *, expires_in_s: int | None = None) -> IssuedApiKey:
        name = name.strip()
        if not name or len(name) > 100:
            raise InvalidApiKeyRequest("name must be 1 to 100 characters", field="name")
        wanted = frozenset(scopes)
        unknown = sorted(wanted - API_KEY_SCOPES)
        if unknown:
            raise InvalidApiKeyRequest(f"scopes not grantable to an API key: {unknown}", field="scopes")
        if expires_in_s is not None and expires_in_s <= 0:
            raise InvalidApiKeyRequest("expires_in_s must be positive", field="expires_in_s")
        prefix = secrets.token_hex(4)
        secret = f"{_KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
        now = self._clock.now()
        key = ApiKey(
            id=new_id(),
            name=name,
            prefix=f"{_KEY_PREFIX}{prefix}",
            scopes=wanted,
            created_at=now,
            expires_at=None if expires_in_s is None else now + timedelta(seconds=expires_in_s),
            revoked_at=None,
        )
        async with self._db.write() as conn:
            await conn.execute(
                insert(api_keys).values(
                    id=key.id,
                    name=key.name,
                    prefix=key.prefix,
                    key_hash=self._digest(secret),
                    scopes=" ".join(sorted(key.scopes)),
                    created_at=key.created_at,
                    expires_at=key.expires_at,
                    revoked_at=None,
                )
            )
        return IssuedApiKey(key=key, secret=secret)

    async def list(self) -> list[ApiKey]:
        async with self._db.read() as conn:
            rows = await conn.execute(select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id))
            return [_row(row) for row in rows]

    async def revoke(self, key_id: uuid.UUID) -> ApiKey:
        """Revoke (idempotent: the first revocation's time is kept)."""
        async with self._db.write() as conn:
            await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=self._clock.now())
            )
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        if row is None:
            raise ApiKeyNotFound(f"API key {key_id} not found")
        self._cache.clear()  # this process honours it at once; others within cache_ttl_s
        return _row(row)

    async def authenticate(self, raw: str) -> Principal | None:
        """The key's principal, or None for an unknown, revoked or expired key."""
        if not raw.startswith(_KEY_PREFIX) or len(raw) > _MAX_KEY_LENGTH:
            return None
        digest = self._digest(raw)
        mono = self._clock.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and mono - cached[1] < self._ttl_s:
            key = cached[0]
        else:
            async with self._db.read() as conn:
                row = (await conn.execute(select(api_keys).where(api_keys.c.key_hash == digest))).first()
            key = _row(row) if row is not None else None
            self._cache[digest] = (key, mono)
            self._cache.move_to_end(digest)
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        if key is None or not key.usable(self._clock.now()):
            return None
        return key.principal()
