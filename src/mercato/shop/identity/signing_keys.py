"""The access-token signing keys every process shares (ADR 0036), kept in `identity_signing_keys`.

Each process holds the set in a `KeyRing` (what `TokenCodec` signs and verifies with, no statement on
the request path) and reloads it at most `reload_s` after any change: the API's lifespan runs
`run_reloader`, and token issuers call `ready()`. A rotation is seen at once by the process that made
it. Private halves are stored sealed (AES-GCM, a key derived from MERCATO_AUTH_SECRET).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from mercato.kit.auth.keys import KeyRing, KeySealer, SigningKey, public_key_from
from mercato.kit.clock import Clock
from mercato.kit.errors import Conflict
from mercato.kit.storage import Database
from mercato.shop.identity.tables import signing_keys

log = logging.getLogger(__name__)


class ConcurrentRotation(Conflict):
    def __init__(self) -> None:
        super().__init__("another rotation committed first; list the keys and retry if still needed")


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """One row of `mercato keys list`."""

    kid: str
    generation: int
    created_at: datetime
    retired_at: datetime | None
    verifies_until: datetime | None
    state: str  # signing | verifying | expired

    def as_dict(self) -> dict[str, object]:
        def iso(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "kid": self.kid,
            "generation": self.generation,
            "state": self.state,
            "created_at": iso(self.created_at),
            "retired_at": iso(self.retired_at),
            "verifies_until": iso(self.verifies_until),
        }


class SigningKeyStore:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        ring: KeyRing,
        *,
        secret: str,
        reload_s: float = 30.0,
    ) -> None:
        if reload_s <= 0:
            raise ValueError("reload_s must be > 0")
        self._db = db
        self._clock = clock
        self._ring = ring
        self._sealer = KeySealer(secret)
        self._reload_s = reload_s
        self._loaded_at: float | None = None
        self._lock = asyncio.Lock()

    @property
    def ring(self) -> KeyRing:
        return self._ring

    @property
    def reload_s(self) -> float:
        return self._reload_s

    async def ensure_loaded(self) -> None:
        """`KeyLoader`: load once (the request path's only call; reloads run in the background)."""
        if self._loaded_at is None:
            await self.ready()

    def _fresh(self) -> bool:
        return self._loaded_at is not None and self._clock.monotonic() - self._loaded_at < self._reload_s

    async def ready(self, *, force: bool = False) -> None:
        """Load the keys if never loaded, older than `reload_s` or `force`, creating the first one if
        none exists (whichever process starts first creates it; the unique generation settles a race).
        A failed load leaves the previous ring, and its load time, as they were."""
        if not force and self._fresh():
            return
        async with self._lock:
            if not force and self._fresh():
                return
            await self.reload()
            if self._ring.signer() is None:
                await self._insert_next(retire=False)
                await self.reload()

    async def reload(self) -> None:
        """Read every key row into the ring (one statement)."""
        async with self._db.read() as conn:
            rows = (await conn.execute(select(signing_keys))).mappings().all()
        keys = [
            SigningKey(
                kid=row["kid"],
                generation=row["generation"],
                public=public_key_from(row["public_key"]),
                private=self._sealer.open(row["kid"], row["sealed_private_key"]),
                created_at=row["created_at"],
                retired_at=row["retired_at"],
            )
            for row in rows
        ]
        self._ring.replace(keys)
        self._loaded_at = self._clock.monotonic()

    async def rotate(self) -> SigningKey:
        """A new key signs from now on; the previous ones verify until `retired_at + overlap`."""
        async with self._lock:
            key = await self._insert_next(retire=True)
            await self.reload()
        assert key is not None
        return key

    async def status(self) -> list[KeyStatus]:
        await self.reload()
        now = self._clock.now()
        signer = self._ring.signer()
        result = []
        for key in self._ring.keys:
            if signer is not None and key.kid == signer.kid:
                state = "signing"
            elif self._ring.verifier(key.kid, now) is not None:
                state = "verifying"
            else:
                state = "expired"
            result.append(
                KeyStatus(
                    kid=key.kid,
                    generation=key.generation,
                    created_at=key.created_at,
                    retired_at=key.retired_at,
                    verifies_until=key.verifies_until(self._ring.overlap_s),
                    state=state,
                )
            )
        return result

    async def run_reloader(self) -> None:
        """Reload every `reload_s` until cancelled (the API's lifespan runs it); a failed reload
        keeps the previous ring, and is retried at the next tick."""
        while True:
            await asyncio.sleep(self._reload_s)
            try:
                await self.ready(force=True)
            except Exception:  # a database blip must not end the reloader
                log.warning("signing key reload failed; keeping the previous keys", exc_info=True)

    async def _insert_next(self, *, retire: bool) -> SigningKey | None:
        """Insert the next generation (retiring the current ones if `retire`); None when this was
        the first key and another process created it meanwhile."""
        now = self._clock.now()
        try:
            async with self._db.write() as conn:
                latest = (await conn.execute(select(func.max(signing_keys.c.generation)))).scalar()
                if latest is not None and not retire:
                    return None
                key = SigningKey.generate(generation=(latest or 0) + 1, now=now)
                if retire:
                    await conn.execute(
                        update(signing_keys).where(signing_keys.c.retired_at.is_(None)).values(retired_at=now)
                    )
                await conn.execute(
                    insert(signing_keys).values(
                        kid=key.kid,
                        generation=key.generation,
                        public_key=key.public_bytes(),
                        sealed_private_key=self._sealer.seal(key),
                        created_at=now,
                        retired_at=None,
                    )
                )
        except IntegrityError:
            if retire:
                raise ConcurrentRotation() from None
            return None  # a concurrent first start inserted generation 1: theirs is the key
        return key
