"""The PSP's state machine and its append-only ledger, on the PSP's own tables.

Every transition is a guarded UPDATE (`... WHERE status = 'authorized'`) checked by row count, so two
different keys racing to capture the same authorization cannot both win, on SQLite or PostgreSQL.
"""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from typing import Any

from sqlalchemy import BigInteger, Column, ForeignKey, Index, String, Table, bindparam, func, select

from mercato.kit.clock import Clock
from mercato.kit.ids import new_id
from mercato.kit.storage import UTCDateTime
from mercato.kit.storage.inline_sqlite import SqlConnection, SqlDatabase
from mercato.kit.storage.statements import driver_prepared
from mercato.kit.web.pagination import Cursor, CursorError
from mercato.providers._edge import ProviderProblem
from mercato.providers._idempotency import IdempotencyStore, Outcome, idempotency_table
from mercato.providers._storage import create_tables, new_metadata, row_insert
from mercato.providers.psp.models import (
    AuthorizationOut,
    AuthorizationStatus,
    AuthorizeIn,
    CaptureOut,
    LedgerEntry,
    LedgerKind,
    LedgerPage,
    LedgerSummary,
    OrderLedger,
    RefundOut,
)

__all__ = ["DECLINING_TOKENS", "PaymentProvider", "psp_metadata"]

psp_metadata = new_metadata()

authorizations = Table(
    "psp_authorizations",
    psp_metadata,
    Column("id", String(36), primary_key=True),
    Column("order_reference", String(128), nullable=False, index=True),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("status", String(16), nullable=False),
    Column("decline_reason", String(64), nullable=True),
    Column("captured_minor", BigInteger, nullable=False, default=0),
    Column("capture_id", String(36), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

captures = Table(
    "psp_captures",
    psp_metadata,
    Column("id", String(36), primary_key=True),
    Column("authorization_id", String(36), ForeignKey("psp_authorizations.id"), nullable=False, unique=True),
    Column("order_reference", String(128), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("refunded_minor", BigInteger, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
)

ledger = Table(
    "psp_ledger",
    psp_metadata,
    Column("id", String(36), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("order_reference", String(128), nullable=False),
    Column("authorization_id", String(36), nullable=False),
    Column("capture_id", String(36), nullable=True),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("idempotency_key", String(255), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_psp_ledger_order_reference_id", "order_reference", "id"),
)

idempotency_keys = idempotency_table(psp_metadata, "psp")

# The hot operations' statements, built once: a statement built per call (`.values(...)`,
# `.where(... == value)`) has its elements and cache key made again every time, which cost more CPU
# than SQLite's own work (ADR 0071). Values travel as parameters.
# Registered for the driver path: on the inline SQLite database they skip SQLAlchemy's execution.
_INSERT_AUTHORIZATION = row_insert(authorizations)
_INSERT_CAPTURE = row_insert(captures)
_INSERT_LEDGER_ENTRY = row_insert(ledger)
_AUTHORIZATION_BY_ID = driver_prepared(
    select(authorizations).where(authorizations.c.id == bindparam("b_id", type_=authorizations.c.id.type))
)
_TRANSITION_FROM_AUTHORIZED = authorizations.update().where(
    authorizations.c.id == bindparam("b_id", type_=authorizations.c.id.type),
    authorizations.c.status == AuthorizationStatus.AUTHORIZED.value,
)


@functools.cache
def _transition_statement(columns: tuple[str, ...]) -> Any:
    """The guarded transition setting `columns` (one registered statement per set of columns)."""
    return driver_prepared(
        _TRANSITION_FROM_AUTHORIZED.values(
            {name: bindparam(name, type_=authorizations.c[name].type) for name in columns}
        )
    )


# Deterministic declines for tests and demos, like a real PSP's test card numbers.
DECLINING_TOKENS = {"tok_decline": "card_declined", "tok_insufficient_funds": "insufficient_funds"}

_SUMMARY_FIELDS = {
    LedgerKind.AUTHORIZATION: ("authorizations", "authorized_minor"),
    LedgerKind.DECLINE: ("declines", None),
    LedgerKind.CAPTURE: ("captures", "captured_minor"),
    LedgerKind.VOID: ("voids", "voided_minor"),
    LedgerKind.REFUND: ("refunds", "refunded_minor"),
}


def _auth_out(row: Any) -> AuthorizationOut:
    return AuthorizationOut(
        authorization_id=row["id"],
        order_reference=row["order_reference"],
        amount_minor=row["amount_minor"],
        currency=row["currency"],
        status=AuthorizationStatus(row["status"]),
        decline_reason=row["decline_reason"],
        captured_minor=row["captured_minor"],
        capture_id=row["capture_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _capture_out(row: Any) -> CaptureOut:
    return CaptureOut(
        capture_id=row["id"],
        authorization_id=row["authorization_id"],
        order_reference=row["order_reference"],
        amount_minor=row["amount_minor"],
        currency=row["currency"],
        refunded_minor=row["refunded_minor"],
        created_at=row["created_at"],
    )


class PaymentProvider:
    """Authorize, capture, void and refund, each behind its `Idempotency-Key`, plus the ledger reads."""

    def __init__(
        self, db: SqlDatabase, *, clock: Clock, rng: random.Random, decline_rate: float = 0.0
    ) -> None:
        if not 0.0 <= decline_rate <= 1.0:
            raise ValueError("decline_rate must be within [0, 1]")
        self.db = db
        self.clock = clock
        self.rng = rng
        self.decline_rate = decline_rate
        self.idempotency = IdempotencyStore(db, idempotency_keys, clock)

    async def start(self) -> None:
        await create_tables(self.db, psp_metadata)

    async def close(self) -> None:
        await self.db.dispose()

    # -- operations: each runs inside the idempotency store's write transaction --------------------

    async def authorize(self, conn: SqlConnection, body: AuthorizeIn, key: str) -> Outcome:
        now = self.clock.now()
        reason = DECLINING_TOKENS.get(body.card_token or "")
        if reason is None and self.decline_rate > 0 and self.rng.random() < self.decline_rate:
            reason = "card_declined"
        status = AuthorizationStatus.DECLINED if reason else AuthorizationStatus.AUTHORIZED
        auth_id = str(new_id())
        row = {
            "id": auth_id,
            "order_reference": body.order_reference,
            "amount_minor": body.amount_minor,
            "currency": body.currency,
            "status": status.value,
            "decline_reason": reason,
            "captured_minor": 0,
            "capture_id": None,
            "created_at": now,
            "updated_at": now,
        }
        await conn.execute(_INSERT_AUTHORIZATION, row)
        kind = LedgerKind.DECLINE if reason else LedgerKind.AUTHORIZATION
        await self._record(conn, kind, row, amount_minor=body.amount_minor, key=key)
        return Outcome(
            201,
            _auth_out(row).model_dump(mode="json"),
            {"Location": f"/v1/authorizations/{auth_id}"},
        )

    async def capture(self, conn: SqlConnection, auth_id: str, amount_minor: int, key: str) -> Outcome:
        auth = await self._authorization_for_update(conn, auth_id)
        if amount_minor > auth["amount_minor"]:
            raise ProviderProblem(
                422,
                "amount-exceeds-authorized",
                "Amount exceeds the authorization",
                f"at most {auth['amount_minor']} may be captured",
            )
        now = self.clock.now()
        capture_id = str(new_id())
        await self._transition(
            conn, auth, AuthorizationStatus.CAPTURED, captured_minor=amount_minor, capture_id=capture_id
        )
        capture = {
            "id": capture_id,
            "authorization_id": auth_id,
            "order_reference": auth["order_reference"],
            "amount_minor": amount_minor,
            "currency": auth["currency"],
            "refunded_minor": 0,
            "created_at": now,
        }
        await conn.execute(_INSERT_CAPTURE, capture)
        await self._record(
            conn, LedgerKind.CAPTURE, auth, amount_minor=amount_minor, key=key, capture_id=capture_id
        )
        return Outcome(
            201, _capture_out(capture).model_dump(mode="json"), {"Location": f"/v1/captures/{capture_id}"}
        )

    async def void(self, conn: SqlConnection, auth_id: str, key: str) -> Outcome:
        auth = await self._authorization_for_update(conn, auth_id)
        await self._transition(conn, auth, AuthorizationStatus.VOIDED)
        await self._record(conn, LedgerKind.VOID, auth, amount_minor=auth["amount_minor"], key=key)
        row = (
            (await conn.execute(select(authorizations).where(authorizations.c.id == auth_id)))
            .mappings()
            .one()
        )
        return Outcome(200, _auth_out(row).model_dump(mode="json"))

    async def refund(self, conn: SqlConnection, capture_id: str, amount_minor: int, key: str) -> Outcome:
        row = (await conn.execute(select(captures).where(captures.c.id == capture_id))).mappings().first()
        if row is None:
            raise ProviderProblem(404, "capture-not-found", "Capture not found", f"no capture {capture_id}")
        refundable = row["amount_minor"] - row["refunded_minor"]
        # Guarded so two concurrent refunds cannot together exceed the captured amount.
        updated = await conn.execute(
            captures.update()
            .where(
                captures.c.id == capture_id,
                captures.c.refunded_minor + amount_minor <= captures.c.amount_minor,
            )
            .values(refunded_minor=captures.c.refunded_minor + amount_minor)
        )
        if updated.rowcount != 1:
            raise ProviderProblem(
                422,
                "amount-exceeds-refundable",
                "Amount exceeds what is refundable",
                f"at most {refundable} may still be refunded",
            )
        refund_id = await self._record(
            conn,
            LedgerKind.REFUND,
            row,
            amount_minor=amount_minor,
            key=key,
            capture_id=capture_id,
            authorization_id=row["authorization_id"],
        )
        refund = RefundOut(
            refund_id=refund_id,
            capture_id=capture_id,
            authorization_id=row["authorization_id"],
            order_reference=row["order_reference"],
            amount_minor=amount_minor,
            currency=row["currency"],
            created_at=self.clock.now(),
        )
        return Outcome(201, refund.model_dump(mode="json"))

    # -- reads -----------------------------------------------------------------------------------

    async def get_authorization(self, auth_id: str) -> AuthorizationOut:
        async with self.db.read() as conn:
            row = (
                (await conn.execute(select(authorizations).where(authorizations.c.id == auth_id)))
                .mappings()
                .first()
            )
        if row is None:
            raise _auth_not_found(auth_id)
        return _auth_out(row)

    async def get_capture(self, capture_id: str) -> CaptureOut:
        async with self.db.read() as conn:
            row = (await conn.execute(select(captures).where(captures.c.id == capture_id))).mappings().first()
        if row is None:
            raise ProviderProblem(404, "capture-not-found", "Capture not found", f"no capture {capture_id}")
        return _capture_out(row)

    async def ledger_page(self, *, order_reference: str | None, limit: int, cursor: str | None) -> LedgerPage:
        query = select(ledger).order_by(ledger.c.id).limit(limit + 1)
        if order_reference is not None:
            query = query.where(ledger.c.order_reference == order_reference)
        if cursor:
            try:
                after = Cursor.decode(cursor, expected_sort="id").id
            except CursorError as exc:
                raise ProviderProblem(400, "invalid-cursor", "Invalid cursor", str(exc)) from exc
            query = query.where(ledger.c.id > after)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).mappings().all()
        items = [
            LedgerEntry(
                entry_id=r["id"],
                kind=LedgerKind(r["kind"]),
                order_reference=r["order_reference"],
                authorization_id=r["authorization_id"],
                capture_id=r["capture_id"],
                amount_minor=r["amount_minor"],
                currency=r["currency"],
                idempotency_key=r["idempotency_key"],
                created_at=r["created_at"],
            )
            for r in rows[:limit]
        ]
        next_cursor = (
            Cursor(sort="id", value=None, id=items[-1].entry_id).encode() if len(rows) > limit else None
        )
        return LedgerPage(items=items, next_cursor=next_cursor)

    async def summary(self, *, order_reference: str | None = None) -> LedgerSummary:
        query = select(
            ledger.c.order_reference,
            ledger.c.kind,
            func.count(),
            func.coalesce(func.sum(ledger.c.amount_minor), 0),
        ).group_by(ledger.c.order_reference, ledger.c.kind)
        if order_reference is not None:
            query = query.where(ledger.c.order_reference == order_reference)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        per_order: dict[str, dict[str, int]] = defaultdict(dict)
        totals: dict[str, int] = {}
        for ref, kind, count, total in rows:
            count_field, sum_field = _SUMMARY_FIELDS[LedgerKind(kind)]
            for target in (per_order[ref], totals):
                target[count_field] = target.get(count_field, 0) + int(count)
                if sum_field:
                    target[sum_field] = target.get(sum_field, 0) + int(total)
        return LedgerSummary(
            orders=[OrderLedger(order_reference=ref, **fields) for ref, fields in sorted(per_order.items())],
            totals=OrderLedger(order_reference="*", **totals),
        )

    # -- helpers ---------------------------------------------------------------------------------

    async def _authorization_for_update(self, conn: SqlConnection, auth_id: str) -> Any:
        row = (await conn.execute(_AUTHORIZATION_BY_ID, {"b_id": auth_id})).mappings().first()
        if row is None:
            raise _auth_not_found(auth_id)
        return row

    async def _transition(
        self, conn: SqlConnection, auth: Any, target: AuthorizationStatus, **values: Any
    ) -> None:
        # The SET list is the parameters' keys (one registered statement per set of keys).
        params = {"status": target.value, "updated_at": self.clock.now(), **values}
        updated = await conn.execute(
            _transition_statement(tuple(sorted(params))), {"b_id": auth["id"], **params}
        )
        if updated.rowcount == 1:
            return
        current = (
            await conn.execute(select(authorizations.c.status).where(authorizations.c.id == auth["id"]))
        ).scalar_one()
        raise _state_conflict(AuthorizationStatus(current))

    async def _record(
        self,
        conn: SqlConnection,
        kind: LedgerKind,
        source: Any,
        *,
        amount_minor: int,
        key: str,
        capture_id: str | None = None,
        authorization_id: str | None = None,
    ) -> str:
        entry_id = str(new_id())
        # Values as parameters, not `.values(...)`: a statement built per call costs more CPU than
        # the whole SQLite insert (its elements and cache key are rebuilt every time).
        await conn.execute(
            _INSERT_LEDGER_ENTRY,
            {
                "id": entry_id,
                "kind": kind.value,
                "order_reference": source["order_reference"],
                "authorization_id": authorization_id or source["id"],
                "capture_id": capture_id,
                "amount_minor": amount_minor,
                "currency": source["currency"],
                "idempotency_key": key,
                "created_at": self.clock.now(),
            },
        )
        return entry_id


def _auth_not_found(auth_id: str) -> ProviderProblem:
    return ProviderProblem(
        404, "authorization-not-found", "Authorization not found", f"no authorization {auth_id}"
    )


_CONFLICTS = {
    AuthorizationStatus.CAPTURED: ("already-captured", "Authorization already captured"),
    AuthorizationStatus.VOIDED: ("already-voided", "Authorization already voided"),
    AuthorizationStatus.DECLINED: ("authorization-declined", "Authorization was declined"),
}


def _state_conflict(current: AuthorizationStatus) -> ProviderProblem:
    slug, title = _CONFLICTS.get(current, ("invalid-state", "Invalid state"))
    return ProviderProblem(409, slug, title, f"the authorization is {current.value}")
