"""Access tokens that verify but must still be refused: logged out (revoked by `jti`), or whose
subject no longer exists or is disabled (ADR 0027).

Revocations live in `identity_revoked_tokens` (shared by every process) until the token they name
expires; each process keeps the live ones in memory and catches up with the table at most every
`sync_interval_s`, so a logout in one process is honoured by every other within that bound (and at
once in the process that took it). Subjects are looked up once per `subject_ttl_s` per process:
a deleted account's tokens stop working within that bound, a disabled one's at once where it was
disabled. Neither check costs a statement on the common request.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from mercato.kit.auth import InvalidToken, Principal
from mercato.kit.clock import Clock
from mercato.kit.observability import get_logger
from mercato.kit.storage import Database
from mercato.kit.storage.statements import DriverReads, driver_prepared
from mercato.shop.identity.tables import revoked_tokens, users

__all__ = ["SessionGuard"]

_log = get_logger("mercato.identity.sessions")
# A revocation committed by another process can carry a `revoked_at` slightly older than the last
# sync (clock skew between hosts, a transaction that committed late): each sync re-reads this much.
_SYNC_OVERLAP_S = 30.0
# Whether a token's subject may still act: registered for the raw-driver layer.
_SUBJECT = driver_prepared(
    select(users.c.disabled).where(users.c.id == bindparam("id", type_=users.c.id.type))
)


class SessionGuard:
    """The identity context's `TokenGuard`: revocation list by `jti` and subject existence."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        sync_interval_s: float = 1.0,
        subject_ttl_s: float = 5.0,
        max_subjects: int = 50_000,
    ) -> None:
        if sync_interval_s < 0 or subject_ttl_s < 0:
            raise ValueError("sync_interval_s and subject_ttl_s must be >= 0")
        self._db = db
        self._reads = DriverReads(db)
        self._clock = clock
        self._sync_interval_s = sync_interval_s
        self._subject_ttl_s = subject_ttl_s
        self._max_subjects = max_subjects
        self._revoked: dict[str, datetime] = {}  # jti -> the token's expiry
        self._synced_at: float | None = None
        self._watermark: datetime | None = None
        # subject -> (usable, checked at monotonic); oldest first, bounded.
        self._subjects: OrderedDict[str, tuple[bool, float]] = OrderedDict()

    # --- TokenGuard ----------------------------------------------------------------------------

    async def admit(self, principal: Principal) -> None:
        await self._catch_up()
        if principal.token_id and principal.token_id in self._revoked:
            raise InvalidToken("token revoked")
        if not await self._subject_usable(principal.subject):
            raise InvalidToken("the token's subject no longer exists or is disabled")

    # --- revocation ----------------------------------------------------------------------------

    async def revoke(self, principal: Principal) -> None:
        """Refuse this token from now until it expires, in every process (idempotent)."""
        if not principal.token_id or principal.expires_at is None:
            return
        now = self._clock.now()
        if principal.expires_at <= now:
            return  # already refused by its own expiry
        values = {"jti": principal.token_id, "expires_at": principal.expires_at, "revoked_at": now}
        insert = pg_insert if self._db.dialect == "postgresql" else sqlite_insert
        async with self._db.write() as conn:
            await conn.execute(insert(revoked_tokens).values(**values).on_conflict_do_nothing())
        self._revoked[principal.token_id] = principal.expires_at

    async def purge_expired(self) -> int:
        """Delete revocations of tokens that have expired anyway; returns how many."""
        now = self._clock.now()
        async with self._db.write() as conn:
            result = await conn.execute(delete(revoked_tokens).where(revoked_tokens.c.expires_at < now))
        self._revoked = {jti: exp for jti, exp in self._revoked.items() if exp >= now}
        return int(result.rowcount)

    async def _catch_up(self) -> None:
        mono = self._clock.monotonic()
        if self._synced_at is not None and mono - self._synced_at < self._sync_interval_s:
            return
        # Claimed before the query: concurrent requests keep using the current set meanwhile.
        self._synced_at = mono
        now = self._clock.now()
        query = select(revoked_tokens.c.jti, revoked_tokens.c.expires_at, revoked_tokens.c.revoked_at)
        if self._watermark is None:
            query = query.where(revoked_tokens.c.expires_at >= now)
        else:
            since = self._watermark - timedelta(seconds=_SYNC_OVERLAP_S)
            query = query.where(revoked_tokens.c.revoked_at >= since)
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        live = {jti: exp for jti, exp in self._revoked.items() if exp >= now}
        for row in rows:
            if row.expires_at >= now:
                live[row.jti] = row.expires_at
            if self._watermark is None or row.revoked_at > self._watermark:
                self._watermark = row.revoked_at
        if self._watermark is None:
            self._watermark = now
        self._revoked = live

    # --- subjects ------------------------------------------------------------------------------

    def forget_subject(self, subject: str) -> None:
        """Drop what this process knows of a subject (its account changed here)."""
        self._subjects.pop(subject, None)

    async def _subject_usable(self, subject: str) -> bool:
        mono = self._clock.monotonic()
        cached = self._subjects.get(subject)
        if cached is not None and mono - cached[1] < self._subject_ttl_s:
            return cached[0]
        usable = await self._lookup(subject)
        self._subjects[subject] = (usable, mono)
        self._subjects.move_to_end(subject)
        while len(self._subjects) > self._max_subjects:
            self._subjects.popitem(last=False)
        return usable

    async def _lookup(self, subject: str) -> bool:
        try:
            user_id = uuid.UUID(subject)
        except ValueError:
            return False  # every token we issue names an account by its id
        # One autocommitted statement on the raw driver: with many accounts each seen less often
        # than `subject_ttl_s` (the checkout bench's 400 customers at 50/s), this runs on most
        # requests, and a `Database.read()` (BEGIN, SELECT, ROLLBACK through SQLAlchemy) was ~9 %
        # of the API's CPU.
        rows = await self._reads.rows(_SUBJECT, {"id": user_id})
        return bool(rows) and not rows[0][0]
