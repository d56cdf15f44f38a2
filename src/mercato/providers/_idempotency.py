"""`Idempotency-Key` handling the way a real PSP does it, with the key and the effect in one transaction.

A request first *claims* its key in a short transaction (an in-flight record with a lease), then does its
work, then writes the effect and the finished record in a second transaction guarded by the claim token.
So: a retry after a success gets the stored response; a retry while the first is still working gets 409;
a crash mid-work leaves only an in-flight claim, which another request may take over once its lease has
run out, and since the effect commits only together with the finished record, it is never applied twice.
A request with no simulated latency to sit through does all three in one transaction (nobody could
observe its in-flight record): one commit per call instead of two.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from sqlalchemy import (
    Column,
    Insert,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    Update,
    bindparam,
    select,
)
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from mercato.kit.clock import Clock
from mercato.kit.resilience import Deadline
from mercato.kit.storage import UTCDateTime
from mercato.kit.storage.inline_sqlite import SqlConnection, SqlDatabase
from mercato.kit.storage.statements import driver_prepared
from mercato.kit.web.problems import PROBLEM_MEDIA_TYPE
from mercato.providers._edge import (
    DEADLINE_STATE_KEY,
    FAULT_LATENCY_STATE_KEY,
    FastHandler,
    ProviderProblem,
    deadline_exceeded,
    deadline_of,
    latency_of,
    sleep_within,
)
from mercato.providers._storage import row_insert

__all__ = ["IdempotencyStore", "Outcome", "fingerprint", "idempotency_table"]

_IN_FLIGHT = "in_flight"
_DONE = "done"
MAX_KEY_LENGTH = 255


def idempotency_table(metadata: MetaData, prefix: str) -> Table:
    return Table(
        f"{prefix}_idempotency_keys",
        metadata,
        Column("key", String(MAX_KEY_LENGTH), primary_key=True),
        Column("fingerprint", String(64), nullable=False),
        Column("state", String(16), nullable=False),
        Column("claim_token", String(32), nullable=False),
        Column("locked_until", UTCDateTime, nullable=False),
        Column("response_status", Integer, nullable=True),
        Column("response_body", Text, nullable=True),
        Column("response_headers", Text, nullable=True),
        Column("created_at", UTCDateTime, nullable=False),
        Column("expires_at", UTCDateTime, nullable=False),
    )


def fingerprint(method: str, path: str, body: dict[str, Any]) -> str:
    """A digest of what the key promises: the operation and its (parsed, key-order-free) body."""
    canonical = orjson.dumps([method, path, body], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished operation's response; stored verbatim under its key for replays."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def response(self, *, replayed: bool = False) -> Response:
        headers = dict(self.headers)
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        media_type = PROBLEM_MEDIA_TYPE if self.status >= 400 else "application/json"
        return Response(
            orjson.dumps(self.body), status_code=self.status, media_type=media_type, headers=headers
        )


@dataclass(frozen=True, slots=True)
class _Claimed:
    token: str


class _ClaimLost(Exception):
    """The lease ran out and another request took the key over: roll this attempt back."""


Apply = Callable[[SqlConnection], Awaitable[Outcome]]


class IdempotencyStore:
    def __init__(
        self, db: SqlDatabase, table: Table, clock: Clock, *, lease_s: float = 60.0, ttl_s: float = 86_400.0
    ) -> None:
        self.db = db
        self.table = table
        self.clock = clock
        self.lease_s = lease_s
        self.ttl_s = ttl_s

    async def handle(
        self, request: Request, *, key: str | None, body: BaseModel | None, apply: Apply
    ) -> Response:
        """`execute` for a route: the fingerprint covers method, path and body; the latency is the
        one the fault edge drew for this request."""
        payload = body.model_dump(mode="json") if body is not None else {}
        return await self.execute(
            key=key,
            digest=fingerprint(request.method, request.url.path, payload),
            latency_s=latency_of(request),
            instance=request.url.path,
            apply=apply,
            deadline=deadline_of(request),
        )

    def fast_handler(
        self, model: type[BaseModel] | None, operation: Callable[[dict[str, str], Any, str], Apply]
    ) -> FastHandler:
        """`handle` for `ProviderApp.add_fast_post`: the same key rules, fingerprint and answers,
        without the framework's route stack. `operation(path_params, body, key)` gives the apply.
        A request the route's own validation would refuse (no key, a body that is not the model)
        is left to the route (None), so its 400/422 stay the framework's."""

        async def handle(scope: Scope, raw: bytes, params: dict[str, str]) -> Response | None:
            key = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"idempotency-key"), None)
            if not key:
                return None
            body: BaseModel | None = None
            if model is not None:
                try:
                    body = model.model_validate_json(raw)
                except ValidationError:
                    return None
            path = str(scope["path"])
            state = scope.get("state", {})
            deadline = state.get(DEADLINE_STATE_KEY)
            return await self.execute(
                key=key,
                digest=fingerprint("POST", path, body.model_dump(mode="json") if body is not None else {}),
                latency_s=float(state.get(FAULT_LATENCY_STATE_KEY, 0.0)),
                instance=path,
                apply=operation(params, body, key),
                deadline=deadline if isinstance(deadline, Deadline) else None,
            )

        return handle

    async def execute(
        self,
        *,
        key: str | None,
        digest: str,
        latency_s: float,
        instance: str,
        apply: Apply,
        deadline: Deadline | None = None,
    ) -> Response:
        """Run `apply` at most once per key; a `ProviderProblem` it raises is stored like a success.

        The caller's `deadline` is checked once the key is claimed and again after the simulated
        latency, just before the write: past it, the key is released and the answer is a 504 that
        is not stored (nothing was applied, so a retry with the same key may still run it).

        Storing rejections too is what a real PSP does: a retry of "capture 900 of 500" must keep
        getting the same 422, not a different answer because the state moved on meanwhile.
        """
        if not key:
            raise ProviderProblem(
                400, "idempotency-key-missing", "Idempotency-Key required", "send an Idempotency-Key header"
            )
        if len(key) > MAX_KEY_LENGTH:
            raise ProviderProblem(422, "idempotency-key-invalid", "Idempotency-Key too long")
        if latency_s <= 0:
            return await self._execute_at_once(key, digest, instance, apply)
        claim = await self._claim(key, digest)
        if isinstance(claim, Outcome):
            return claim.response(replayed=True)
        try:
            if not await sleep_within(deadline, latency_s):
                raise deadline_exceeded()
            async with self.db.write() as conn:
                try:
                    outcome = await apply(conn)
                except ProviderProblem as problem:
                    # Operations check before they write, so a rejection has changed nothing.
                    outcome = Outcome(problem.status, problem.body(instance), problem.headers or {})
                await self._complete(conn, key, claim.token, outcome)
        except _ClaimLost as exc:
            raise _in_flight() from exc
        except BaseException:
            # Nothing was committed; free the key at once rather than make retries wait out the lease.
            await asyncio.shield(self._release(key, claim.token))
            raise
        return outcome.response()

    async def _execute_at_once(self, key: str, digest: str, instance: str, apply: Apply) -> Response:
        """No simulated wait: the claim, the effect and the finished record in one transaction.

        Nothing else runs between them (the transaction holds SQLite's write lock; on PostgreSQL a
        concurrent first request with the same key waits on our row, then fails its INSERT and
        reads the committed record), so the in-flight record would never be seen by anyone: one
        BEGIN/COMMIT and one write fewer per call than claim-then-complete.
        """
        t = self.table
        for _ in range(2):
            try:
                async with self.db.write() as conn:
                    now = self.clock.now()
                    row = (await conn.execute(_select_key(t), {"b_key": key})).mappings().first()
                    if row is not None:
                        held = self._judge(row, digest, now)
                        if held is not None:
                            return held.response(replayed=True)
                    try:
                        outcome = await apply(conn)
                    except ProviderProblem as problem:
                        outcome = Outcome(problem.status, problem.body(instance), problem.headers or {})
                    done = {
                        "fingerprint": digest,
                        "state": _DONE,
                        "claim_token": uuid.uuid4().hex,
                        "locked_until": now,
                        "response_status": outcome.status,
                        "response_body": orjson.dumps(outcome.body).decode(),
                        "response_headers": orjson.dumps(outcome.headers).decode(),
                        "created_at": now,
                        "expires_at": now + timedelta(seconds=self.ttl_s),
                    }
                    if row is None:
                        await conn.execute(_insert_statement(t), {"key": key, **done})
                    else:  # an expired record, or a claim whose lease ran out: taken over
                        taken = await conn.execute(
                            _take_over_statement(t), {"b_key": key, "b_token": row["claim_token"], **done}
                        )
                        if taken.rowcount != 1:
                            raise _in_flight()  # another request took it over first: roll back
            except IntegrityError:
                continue  # a concurrent first request committed the key: read its record
            return outcome.response()
        raise _in_flight()

    @staticmethod
    def _judge(row: Any, digest: str, now: Any) -> Outcome | None:
        """What an existing record means for a new request: its stored answer (a replay), a
        problem raised (another request's key, or one still in flight), or None: take it over."""
        if row["expires_at"] <= now:
            return None
        if row["fingerprint"] != digest:
            raise ProviderProblem(
                422,
                "idempotency-key-reused",
                "Idempotency-Key reused",
                "this key was used for a different request",
            )
        if row["state"] == _DONE:
            return Outcome(
                status=int(row["response_status"]),
                body=orjson.loads(row["response_body"]),
                headers=orjson.loads(row["response_headers"] or "{}"),
            )
        if row["locked_until"] > now:
            raise _in_flight()
        return None

    async def _claim(self, key: str, digest: str) -> _Claimed | Outcome:
        for _ in range(2):
            try:
                return await self._try_claim(key, digest)
            except IntegrityError:
                # A concurrent first request inserted the key between our read and insert (PostgreSQL;
                # SQLite's BEGIN IMMEDIATE serializes writers); read again to learn its state.
                continue
        raise _in_flight()

    async def _try_claim(self, key: str, digest: str) -> _Claimed | Outcome:
        t = self.table
        now = self.clock.now()
        token = uuid.uuid4().hex
        claim = {
            "fingerprint": digest,
            "state": _IN_FLIGHT,
            "claim_token": token,
            "locked_until": now + timedelta(seconds=self.lease_s),
            "response_status": None,
            "response_body": None,
            "response_headers": None,
            "created_at": now,
            "expires_at": now + timedelta(seconds=self.ttl_s),
        }
        async with self.db.write() as conn:
            row = (await conn.execute(_select_key(t), {"b_key": key})).mappings().first()
            if row is None:
                await conn.execute(_insert_statement(t), {"key": key, **claim})
                return _Claimed(token)
            if row["expires_at"] <= now:
                await conn.execute(t.update().where(t.c.key == key).values(**claim))
                return _Claimed(token)
            held = self._judge(row, digest, now)
            if held is not None:
                return held
            # The first attempt died (crash, timeout) without committing anything: take the key over.
            await conn.execute(
                t.update().where(t.c.key == key).values(claim_token=token, locked_until=claim["locked_until"])
            )
            return _Claimed(token)

    async def _complete(self, conn: SqlConnection, key: str, token: str, outcome: Outcome) -> None:
        t = self.table
        done = await conn.execute(
            _complete_statement(t),
            {
                "b_key": key,
                "b_token": token,
                "state": _DONE,
                "response_status": outcome.status,
                "response_body": orjson.dumps(outcome.body).decode(),
                "response_headers": orjson.dumps(outcome.headers).decode(),
            },
        )
        if done.rowcount != 1:
            raise _ClaimLost

    async def _release(self, key: str, token: str) -> None:
        t = self.table
        async with self.db.write() as conn:
            await conn.execute(
                t.delete().where(t.c.key == key, t.c.claim_token == token, t.c.state == _IN_FLIGHT)
            )


@functools.cache
def _complete_statement(t: Table) -> Update:
    """Built once per table: the values travel as parameters (see `_record` in the PSP service)."""
    return driver_prepared(
        t.update()
        .where(
            t.c.key == bindparam("b_key"), t.c.claim_token == bindparam("b_token"), t.c.state == _IN_FLIGHT
        )
        .values(
            {
                name: bindparam(name, type_=t.c[name].type)
                for name in ("state", "response_status", "response_body", "response_headers")
            }
        )
    )


@functools.cache
def _insert_statement(t: Table) -> Insert:
    return row_insert(t)


@functools.cache
def _select_key(t: Table) -> Select[Any]:
    return driver_prepared(select(t).where(t.c.key == bindparam("b_key", type_=t.c.key.type)))


# What a take-over rewrites: the whole record but its key.
_RECORD = (
    "fingerprint",
    "state",
    "claim_token",
    "locked_until",
    "response_status",
    "response_body",
    "response_headers",
    "created_at",
    "expires_at",
)


@functools.cache
def _take_over_statement(t: Table) -> Update:
    """Rewrite a record whose claim is known (`b_token`), so of two take-overs one wins."""
    return driver_prepared(
        t.update()
        .where(t.c.key == bindparam("b_key", type_=t.c.key.type), t.c.claim_token == bindparam("b_token"))
        .values({name: bindparam(name, type_=t.c[name].type) for name in _RECORD})
    )


def _in_flight() -> ProviderProblem:
    return ProviderProblem(
        409,
        "idempotency-key-in-flight",
        "Request in progress",
        "a request with this Idempotency-Key is still being processed; retry later",
        headers={"Retry-After": "1"},
    )
