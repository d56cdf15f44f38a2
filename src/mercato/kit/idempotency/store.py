"""The database-backed idempotency key store: claim, complete, release, look up, purge.

Every operation is one short write, never held while the handler runs (a write transaction on
SQLite; on PostgreSQL its statements are autocommitted, each safe on its own, ADR 0022):

- `claim` INSERTs an in-flight row, `ON CONFLICT (scope, key) DO NOTHING`. The primary key is the
  arbiter between concurrent requests on every backend: on PostgreSQL a second INSERT waits for the
  first transaction and then inserts nothing; on SQLite `BEGIN IMMEDIATE` serialises the writers
  outright. The loser (no row inserted) reads the existing row and learns whether to replay, refuse
  (422/409) or take it over. A new key is one statement: no savepoint to survive a unique violation.
- Take-overs (the row expired, or its in-flight lock lapsed because its request crashed) are
  compare-and-set on the row's `claim_token`, so of two requests racing to take over one wins.
- `complete` and `release` also match on `claim_token`: a request whose lock lapsed and was taken
  over cannot overwrite or delete the new owner's row.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import and_, bindparam, delete, insert, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.idempotency.tables import COMPLETED, IN_FLIGHT, PATH_LENGTH, idempotency_keys
from mercato.kit.storage import Database
from mercato.kit.storage.statements import DriverReads, driver_prepared

__all__ = [
    "ClaimOutcome",
    "Claimed",
    "IdempotencyRecord",
    "IdempotencyStore",
    "InFlight",
    "Mismatch",
    "Replay",
    "StoredResponse",
    "purge_expired",
]

_t = idempotency_keys.c

# A claim attempt that keeps losing races (row deleted or taken over between our INSERT and
# SELECT) retries a few times; more than that would mean a livelock worth surfacing.
_CLAIM_ATTEMPTS = 5


# Built once, values as parameters: every checkout stores its response through it, on the raw
# driver (`kit/storage/statements.py`): one autocommitted round trip, RETURNING says whether it hit.
_COMPLETE = driver_prepared(
    update(idempotency_keys)
    .where(
        _t.scope == bindparam("b_scope"),
        _t.key == bindparam("b_key"),
        _t.claim_token == bindparam("b_token"),
        _t.state == IN_FLIGHT,
    )
    .values(
        state=bindparam("state"),
        locked_until=bindparam("locked_until"),
        response_status=bindparam("response_status"),
        response_headers=bindparam("response_headers"),
        response_body=bindparam("response_body"),
        expires_at=bindparam("expires_at"),
    )
    .returning(_t.key)
)


def _insert_if_absent(dialect: str) -> Insert | None:
    """`INSERT ... ON CONFLICT (scope, key) DO NOTHING RETURNING key` where the dialect has it: a
    new key's whole claim, one statement on the raw driver (its row comes back when it was new)."""
    module: Any = {"postgresql": postgresql, "sqlite": sqlite}.get(dialect)
    if module is None:
        return None
    values = {column.name: bindparam(column.name, type_=column.type) for column in idempotency_keys.c}
    return driver_prepared(  # type: ignore[no-any-return]
        module.insert(idempotency_keys)
        .values(values)
        .on_conflict_do_nothing(index_elements=[_t.scope, _t.key])
        .returning(_t.key)
    )


_INSERTS_IF_ABSENT = {dialect: _insert_if_absent(dialect) for dialect in ("postgresql", "sqlite")}


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class Claimed:
    """The caller owns the key: run the handler, then `complete` or `release`."""

    scope: str
    key: str
    claim_token: str
    taken_over: bool = False


@dataclass(frozen=True, slots=True)
class Replay:
    """The key's request completed: answer with its stored response."""

    response: StoredResponse


@dataclass(frozen=True, slots=True)
class InFlight:
    """The key's first request still holds its lock."""

    locked_until: datetime


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The key was used for a different request (method, path, query or body)."""


ClaimOutcome = Claimed | Replay | InFlight | Mismatch


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """A read-only view of one row, for polling and for operators."""

    scope: str
    key: str
    fingerprint: str
    state: str
    locked_until: datetime | None
    expires_at: datetime
    response: StoredResponse | None


def _stored_response(row: Any) -> StoredResponse | None:
    if row.response_status is None:
        return None
    headers = tuple((str(name), str(value)) for name, value in orjson.loads(row.response_headers or "[]"))
    return StoredResponse(status=int(row.response_status), headers=headers, body=bytes(row.response_body))


class IdempotencyStore:
    """Idempotency keys in the `idempotency_keys` table of `db`."""

    def __init__(self, db: Database, *, clock: Clock | None = None) -> None:
        self._db = db
        self._clock = clock or SystemClock()
        self._insert_if_absent = _INSERTS_IF_ABSENT.get(db.dialect)
        # The claim of a new key and the stored response: single autocommitted statements on the
        # raw driver, where SQLAlchemy's async adapter cost more CPU than the statement itself.
        self._driver = DriverReads(db)

    @property
    def clock(self) -> Clock:
        return self._clock

    async def claim(
        self,
        *,
        scope: str,
        key: str,
        method: str,
        path: str,
        fingerprint: str,
        ttl_s: float,
        lock_timeout_s: float,
    ) -> ClaimOutcome:
        """Claim `key` for `scope`, or say why not.

        A new key, an expired one, or one whose in-flight lock lapsed (`locked_until <= now`, its
        request presumably crashed) is claimed: the row is (re)written in flight, locked until
        `now + lock_timeout_s` and expiring at `now + ttl_s`. Otherwise a different fingerprint is a
        `Mismatch`, a completed row a `Replay`, a live lock `InFlight`.
        """
        for _ in range(_CLAIM_ATTEMPTS):
            now = self._clock.now()
            token = secrets.token_hex(16)
            fresh = {
                "method": method.upper()[:16],
                "path": path[:PATH_LENGTH],
                "fingerprint": fingerprint,
                "state": IN_FLIGHT,
                "claim_token": token,
                "locked_until": now + timedelta(seconds=lock_timeout_s),
                "response_status": None,
                "response_headers": None,
                "response_body": None,
                "created_at": now,
                "expires_at": now + timedelta(seconds=ttl_s),
            }
            values = {"scope": scope, "key": key, **fresh}
            # A new key: one autocommitted statement on the raw driver (the usual case).
            if self._insert_if_absent is not None and await self._driver.rows(self._insert_if_absent, values):
                return Claimed(scope=scope, key=key, claim_token=token)
            # Autocommit where the database has it: the insert-if-absent and the guarded take-over
            # below are each safe alone, so a transaction would only add two round trips.
            async with self._db.autocommit() as conn:
                if self._insert_if_absent is None and await self._insert(conn, values):
                    return Claimed(scope=scope, key=key, claim_token=token)
                row = await self._row(conn, scope, key)
                if row is None:
                    continue  # released between our INSERT and SELECT: try the INSERT again
                expired = row.expires_at <= now
                if not expired and row.fingerprint != fingerprint:
                    return Mismatch()
                if not expired and row.state == COMPLETED:
                    response = _stored_response(row)
                    assert response is not None  # guaranteed by ck_idempotency_keys_state_consistent
                    return Replay(response)
                if not expired and row.locked_until is not None and row.locked_until > now:
                    return InFlight(locked_until=row.locked_until)
                taken = await conn.execute(
                    update(idempotency_keys)
                    .where(_t.scope == scope, _t.key == key, _t.claim_token == row.claim_token)
                    .values(**fresh)
                )
                if taken.rowcount == 1:
                    return Claimed(scope=scope, key=key, claim_token=token, taken_over=True)
        raise RuntimeError(f"could not claim idempotency key after {_CLAIM_ATTEMPTS} attempts")

    async def complete(self, claim: Claimed, response: StoredResponse, *, ttl_s: float) -> bool:
        """Store the response and release the lock; the key then replays until `now + ttl_s`.

        False when the claim was lost (lock lapsed and taken over, or purged): the response is then
        not stored, because the row belongs to another request.
        """
        now = self._clock.now()
        stored = await self._driver.rows(
            _COMPLETE,
            {
                "b_scope": claim.scope,
                "b_key": claim.key,
                "b_token": claim.claim_token,
                "state": COMPLETED,
                "locked_until": None,
                "response_status": response.status,
                "response_headers": orjson.dumps([list(pair) for pair in response.headers]).decode(),
                "response_body": response.body,
                "expires_at": now + timedelta(seconds=ttl_s),
            },
        )
        return len(stored) == 1

    async def release(self, claim: Claimed) -> bool:
        """Delete the in-flight row so the same key may be used again (a retry runs the handler)."""
        async with self._db.autocommit() as conn:
            result = await conn.execute(delete(idempotency_keys).where(self._owned(claim)))
        return bool(result.rowcount == 1)

    async def lookup(self, *, scope: str, key: str) -> IdempotencyRecord | None:
        """The row as it stands, in a read transaction (cheap enough to poll)."""
        async with self._db.read() as conn:
            row = await self._row(conn, scope, key)
        if row is None:
            return None
        return IdempotencyRecord(
            scope=row.scope,
            key=row.key,
            fingerprint=row.fingerprint,
            state=row.state,
            locked_until=row.locked_until,
            expires_at=row.expires_at,
            response=_stored_response(row),
        )

    @staticmethod
    def _owned(claim: Claimed) -> Any:
        return and_(
            _t.scope == claim.scope,
            _t.key == claim.key,
            _t.claim_token == claim.claim_token,
            _t.state == IN_FLIGHT,
        )

    async def _insert(self, conn: AsyncConnection, values: dict[str, Any]) -> bool:
        """Whether the row was inserted (False: a row for the key exists), on a dialect without
        insert-if-absent.

        A savepoint, because on PostgreSQL a failed statement aborts the whole transaction and we
        still need to read the existing row in this one.
        """
        try:
            async with conn.begin_nested():
                await conn.execute(insert(idempotency_keys).values(**values))
        except IntegrityError:
            return False
        return True

    @staticmethod
    async def _row(conn: AsyncConnection, scope: str, key: str) -> Any:
        return (await conn.execute(select(idempotency_keys).where(_t.scope == scope, _t.key == key))).first()


async def purge_expired(db: Database, *, now: datetime, batch: int = 1000) -> int:
    """Delete every row with `expires_at <= now`, `batch` rows per short transaction; the count removed.

    Batches keep each transaction (and on SQLite the write lock) short, so request traffic is not
    stalled behind a large purge. In-flight rows expire too: a claim older than its TTL is dead.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    removed = 0
    while True:
        victims = select(_t.scope, _t.key).where(_t.expires_at <= now).order_by(_t.expires_at).limit(batch)
        async with db.write() as conn:
            result = await conn.execute(delete(idempotency_keys).where(tuple_(_t.scope, _t.key).in_(victims)))
        count = int(result.rowcount)
        removed += count
        if count < batch:
            return removed
