"""Delivering e-mail notifications: claim what is due, send it, record `sent` or `failed`.

At least once from here, exactly once in the mailbox:

- each notification is sent with a `Message-ID` derived from its id (`message_id_for`), the
  idempotency key the mail provider dedups on; a send whose answer was lost (connection dropped after
  `DATA`) is retried with the same `Message-ID`, so the customer gets one mail, not two;
- a sender claims a row before sending by moving its `next_attempt_at` a lease ahead (a conditional
  UPDATE), so two workers never send the same row at once; a worker that dies mid-send leaves the row
  to be claimed again when the lease runs out, and the `Message-ID` dedups that resend too;
- a transient failure (connection refused or dropped, timeout, SMTP 4xx) is retried with full-jitter
  exponential backoff up to `max_attempts`, then the row is `failed`; a permanent one (SMTP 5xx, no
  address for the customer) is `failed` at once. Each failure records `attempts` and `last_error`.

Only e-mails are delivered here; webhook records stay `pending` (no webhook sender yet).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import and_, bindparam, case, or_, select, update
from sqlalchemy.sql import ClauseElement

from mercato.kit.clock import Clock
from mercato.kit.observability import get_logger
from mercato.kit.resilience import full_jitter_backoff_s
from mercato.kit.storage import Database
from mercato.kit.storage.statements import DriverReads, driver_prepared
from mercato.kit.storage.statements_in_tx import on_connection
from mercato.shop.notifications.model import Channel
from mercato.shop.notifications.tables import notifications

__all__ = [
    "DeliveryRejected",
    "DeliverySettings",
    "MailSender",
    "NotificationDelivery",
    "OutgoingMail",
    "RecipientDirectory",
    "message_id_for",
]

_log = get_logger("mercato.notifications")
_CUSTOMER_PREFIX = "customer:"
_MAX_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class OutgoingMail:
    message_id: str
    sender: str
    recipient: str
    subject: str
    body: str


class DeliveryRejected(Exception):
    """The provider refused for good (SMTP 5xx): retrying the same message cannot succeed."""


class MailSender(Protocol):
    async def send(self, mail: OutgoingMail) -> None:
        """Hand the mail over; raise `DeliveryRejected` for a permanent refusal, anything else for
        a transient one (the outcome is then unknown: the message may have been stored)."""
        ...

    def session(self) -> AbstractAsyncContextManager[None]:
        """The sends of one pass inside it may share a connection (SMTP: one connect, greeting and
        EHLO for the pass, not one per mail); closed when it ends."""
        ...


class RecipientDirectory(Protocol):
    async def emails_of(self, customer_ids: Sequence[uuid.UUID]) -> Mapping[uuid.UUID, str]:
        """The customers' current addresses, in one look-up; an account that is gone is left out."""
        ...


@dataclass(frozen=True, kw_only=True)
class DeliverySettings:
    """`max_attempts` sends before `failed`; between them `uniform(0, min(cap_s, base_s * 2**n))`;
    a claimed row is another sender's again after `lease_s` (above the send timeout)."""

    sender_address: str = "orders@mercato.local"
    max_attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    lease_s: float = 60.0


def message_id_for(notification_id: uuid.UUID) -> str:
    """The notification's `Message-ID`: the same for every attempt, different for every notification."""
    return f"<notification-{notification_id}@mercato.local>"


# A pass's outcomes in one UPDATE: each column a CASE over the rows' ids, only rows still pending
# written (a row settled meanwhile, by a purge say, stays as it is). One statement per size class
# (1, 2, 4 ... 64 rows): a pass's rows padded up to its class with ids no row has (UUID zero
# upwards; ours are UUIDv7), which match nothing, so a handful of prepared statements serve every
# pass size (was an executemany: one round trip on asyncpg, but one execution per row).
_OUTCOME_COLUMNS = ("status", "attempts", "last_error", "next_attempt_at", "sent_at")
_RECORD_MAX_ROWS = 64
_RECORDS: dict[int, ClauseElement] = {}


def _record_statement(size: int) -> ClauseElement:
    statement = _RECORDS.get(size)
    if statement is None:
        n = notifications.c
        ids = [bindparam(f"id{i}", type_=n.id.type) for i in range(size)]

        def column(name: str) -> Any:
            return case(
                *((n.id == ids[i], bindparam(f"{name}{i}", type_=n[name].type)) for i in range(size)),
                else_=n[name],
            )

        statement = _RECORDS[size] = driver_prepared(
            update(notifications)
            .where(n.id.in_(ids), n.status == "pending")
            .values({name: column(name) for name in _OUTCOME_COLUMNS})
        )
    return statement


_n = notifications.c
# Whether any e-mail is due: the idle notifier's look before it opens a write transaction.
_ANY_DUE = driver_prepared(
    select(_n.id)
    .where(
        _n.channel == Channel.EMAIL.value,
        _n.status == "pending",
        or_(
            _n.next_attempt_at.is_(None),
            _n.next_attempt_at <= bindparam("now", type_=_n.next_attempt_at.type),
        ),
    )
    .limit(1)
)


def _size_class(count: int) -> int:
    size = 1
    while size < count:
        size *= 2
    return size


@dataclass(frozen=True, slots=True)
class _Outcome:
    id: uuid.UUID
    status: str
    attempts: int
    error: str | None
    next_attempt_at: datetime | None = None
    sent_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class _Due:
    id: uuid.UUID
    recipient: str
    subject: str
    body: str
    attempts: int


class NotificationDelivery:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        sender: MailSender,
        directory: RecipientDirectory,
        settings: DeliverySettings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._db = db
        self._clock = clock
        self._sender = sender
        self._directory = directory
        self.settings = settings or DeliverySettings()
        self._rng = rng or random.Random()
        self._idle = False  # the last pass found nothing due
        self._reads = DriverReads(db)

    async def deliver_due(self, *, limit: int = 50) -> int:
        """One pass: claim up to `limit` due e-mails (one statement), read their recipients'
        addresses (one look-up), send them one by one on one connection, record every outcome (one
        statement, ADR 0055 and 0074); returns how many.

        After an idle pass, a read-only look comes first: an idle notifier then takes no write
        lock (SQLite) and opens no write transaction every second."""
        if self._idle and not await self._any_due():
            return 0
        due = await self._claim(limit)
        self._idle = not due
        if not due:
            return 0
        # Every recipient's address in one look-up (was one read transaction per mail), then one
        # mail at a time on one connection to the provider (was a connection per mail).
        addresses = await self._resolve_all([item.recipient for item in due])
        async with self._sender.session():
            outcomes = [await self._deliver(item, addresses.get(item.recipient)) for item in due]
        await self._record(outcomes)
        return len(due)

    async def _any_due(self) -> bool:
        # One autocommitted statement on the raw driver (was a read transaction through SQLAlchemy:
        # BEGIN, the SELECT compiled per call, ROLLBACK), every idle pass of every worker.
        return bool(await self._reads.rows(_ANY_DUE, {"now": self._clock.now()}))

    def _is_due(self, now: datetime) -> object:
        n = notifications.c
        return and_(
            n.channel == Channel.EMAIL.value,
            n.status == "pending",
            or_(n.next_attempt_at.is_(None), n.next_attempt_at <= now),
        )

    async def _claim(self, limit: int) -> list[_Due]:
        """Claim up to `limit` due rows in one statement: their `next_attempt_at` moves a lease
        ahead. The due rows are picked `FOR UPDATE SKIP LOCKED` (PostgreSQL; SQLite has one writer)
        and the outer conditions checked again on them, so two senders never claim one row; a
        materialized CTE, as the saga claim's, so the limit holds (see `SagaStore.claim_due`)."""
        n = notifications.c
        now = self._clock.now()
        lease_until = now + timedelta(seconds=self.settings.lease_s)
        due = (
            select(n.id)
            .where(self._is_due(now))  # type: ignore[arg-type]
            .order_by(n.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("due_notifications")
            .prefix_with("MATERIALIZED")
        )
        async with self._db.write() as conn:
            rows = (
                await conn.execute(
                    update(notifications)
                    .where(n.id.in_(select(due.c.id)), self._is_due(now))  # type: ignore[arg-type]
                    .values(next_attempt_at=lease_until)
                    .returning(n.id, n.recipient, n.subject, n.body, n.attempts)
                )
            ).all()
        return [
            _Due(row.id, row.recipient, row.subject, row.body, int(row.attempts))
            for row in sorted(rows, key=lambda row: row.id)
        ]

    async def _deliver(self, item: _Due, address: str | None) -> _Outcome:
        """Send one claimed mail; what to record for it (written with the pass's others)."""
        attempts = item.attempts + 1
        try:
            if address is None:
                raise DeliveryRejected("the customer has no e-mail address on file")
            await self._sender.send(
                OutgoingMail(
                    message_id=message_id_for(item.id),
                    sender=self.settings.sender_address,
                    recipient=address,
                    subject=item.subject,
                    body=item.body,
                )
            )
        except DeliveryRejected as exc:
            _log.warning("notification_failed", notification=str(item.id), attempts=attempts, permanent=True)
            return _Outcome(item.id, status="failed", attempts=attempts, error=_describe(exc))
        except Exception as exc:  # noqa: BLE001 - transient: retried with backoff, then failed
            if attempts >= self.settings.max_attempts:
                _log.warning(
                    "notification_failed", notification=str(item.id), attempts=attempts, permanent=False
                )
                return _Outcome(item.id, status="failed", attempts=attempts, error=_describe(exc))
            pause_s = full_jitter_backoff_s(
                attempts - 1,
                base_s=self.settings.backoff_base_s,
                cap_s=self.settings.backoff_cap_s,
                rng=self._rng,
            )
            _log.info(
                "notification_retry",
                notification=str(item.id),
                attempts=attempts,
                retry_in_s=round(pause_s, 3),
            )
            return _Outcome(
                item.id,
                status="pending",
                attempts=attempts,
                error=_describe(exc),
                next_attempt_at=self._clock.now() + timedelta(seconds=pause_s),
            )
        return _Outcome(item.id, status="sent", attempts=attempts, error=None, sent_at=self._clock.now())

    async def _resolve_all(self, recipients: Sequence[str]) -> dict[str, str]:
        """Recipient reference (`customer:<id>`) -> address, for those that have one. A directory
        that fails fails the pass: its rows are claimed again when their lease runs out."""
        customers: dict[str, uuid.UUID] = {}
        for recipient in recipients:
            if recipient.startswith(_CUSTOMER_PREFIX):
                try:
                    customers[recipient] = uuid.UUID(recipient.removeprefix(_CUSTOMER_PREFIX))
                except ValueError:
                    continue
        if not customers:
            return {}
        found = await self._directory.emails_of(list(dict.fromkeys(customers.values())))
        return {ref: found[cid] for ref, cid in customers.items() if cid in found}

    async def _record(self, outcomes: list[_Outcome]) -> None:
        """Every outcome of a pass in one transaction and one statement per 64 (`_record_statement`)."""
        if not outcomes:
            return
        async with self._db.write() as conn:
            executor = on_connection(conn)
            for start in range(0, len(outcomes), _RECORD_MAX_ROWS):
                chunk = outcomes[start : start + _RECORD_MAX_ROWS]
                size = _size_class(len(chunk))
                params: dict[str, Any] = {}
                for i in range(size):
                    o = chunk[i] if i < len(chunk) else None
                    params |= {
                        f"id{i}": o.id if o is not None else uuid.UUID(int=i),
                        f"status{i}": o.status if o is not None else "pending",
                        f"attempts{i}": o.attempts if o is not None else 0,
                        f"last_error{i}": o.error if o is not None else None,
                        f"next_attempt_at{i}": o.next_attempt_at if o is not None else None,
                        f"sent_at{i}": o.sent_at if o is not None else None,
                    }
                await executor.run(_record_statement(size), params)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text[:_MAX_ERROR_CHARS]
