"""Transactional outbox and its relay.

A service writes its state change and the messages announcing it in ONE transaction
(`Outbox.add(conn, message)` on the caller's connection): both commit or neither does, so there is
never an event for a change that rolled back, nor a change whose event was lost.

The relay then moves committed rows to the stream, at least once:

1. claim (one statement): the oldest unpublished rows whose lease is free, with
   `FOR UPDATE SKIP LOCKED` on PostgreSQL so concurrent relays take disjoint rows (SQLite's write
   lock serializes claims); the claim is a lease (`claimed_until`) rather than a held lock, so no
   database transaction stays open while the broker is called;
2. publish to the stream (idempotent on message id);
3. mark published, only if the lease is still ours.

A crash after 2 and before 3 republishes once the lease expires: a duplicate the stream's id dedup
absorbs, and which the consumers' inbox would absorb on a broker without it. Never a loss.

When the stream is the SQL log on the outbox's own database (`SqlLogStream.publish_claimed`), the
three are one transaction instead (ADR 0083): the claim locks its rows and marks them published,
the append follows, both commit or neither does, so a crash anywhere republishes nothing and loses
nothing; the relays' announcement (a `pg_notify`) rides in the claim, delivered at that commit.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import (
    Integer,
    Text,
    TypeDecorator,
    any_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.selectable import CTE

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.ids import new_id
from mercato.kit.messaging.hooks import MessagingHook, NullMessagingHook
from mercato.kit.messaging.message import Message
from mercato.kit.messaging.stream import Publisher
from mercato.kit.messaging.tables import outbox
from mercato.kit.observability import carrier_of, context_from, get_logger, trace_carrier, tracer
from mercato.kit.storage import Database
from mercato.kit.storage.signals import WorkSignals, notify_statement, origin_notify_statement
from mercato.kit.storage.statements import DriverReads, Executor, driver_prepared
from mercato.kit.storage.statements_in_tx import on_connection

__all__ = [
    "MAX_STAGED_ROWS",
    "OUTBOX_CHANNEL",
    "ClaimingLog",
    "Outbox",
    "OutboxBacklog",
    "OutboxRelay",
    "StagedRows",
    "insert_after",
    "plain_insert",
]

# The work signal (kit/storage/signals.py) a committed outbox row fires: the relay waits on it.
OUTBOX_CHANNEL = "outbox"
_log = get_logger("mercato.messaging")


@runtime_checkable
class ClaimingLog(Protocol):
    """A stream in a database that can append in a writer's own transaction (`SqlLogStream`)."""

    @property
    def database(self) -> Database: ...

    async def publish_claimed(
        self, claim: Callable[[Executor], Awaitable[Sequence[Message]]]
    ) -> list[Message]: ...


class Outbox:
    """Writes messages in the caller's transaction. Holds no connection of its own."""

    def __init__(self, *, clock: Clock | None = None, signals: WorkSignals | None = None) -> None:
        self._clock = clock or SystemClock()
        self._signals = signals

    async def add(self, conn: AsyncConnection, message: Message) -> None:
        await self.add_many(conn, [message])

    async def add_many(self, conn: AsyncConnection, messages: Sequence[Message]) -> None:
        if not messages:
            return
        rows, notify = self._rows(conn, messages)
        executor = on_connection(conn)
        for start in range(0, len(rows), _ROWS_PER_INSERT):
            batch = rows[start : start + _ROWS_PER_INSERT]
            await executor.run(_insert_statement(len(batch), notify=notify), _params(batch))

    def stage(self, conn: AsyncConnection, messages: Sequence[Message]) -> StagedRows | None:
        """`messages` as rows for another statement of `conn`'s transaction to insert, chained after
        a write of its own (`insert_after`): that write and its messages then cost one statement.
        None when there are none, or more than `MAX_STAGED_ROWS` (then `add_many`)."""
        if not messages or len(messages) > MAX_STAGED_ROWS:
            return None
        rows, notify = self._rows(conn, messages)
        return StagedRows(params=_params(rows), count=len(rows), notify=notify)

    def _rows(self, conn: AsyncConnection, messages: Sequence[Message]) -> tuple[list[dict[str, Any]], bool]:
        """The outbox rows of `messages`, and whether their insert carries the NOTIFY; the relay of
        this process is told to wake when `conn`'s transaction commits."""
        # The trace the change was made in travels with its messages (CloudEvents distributed-tracing
        # extension): the relay, the stream and every consumer continue it.
        carrier = trace_carrier()
        if carrier:
            messages = [
                m if "traceparent" in m.headers else dataclasses.replace(m, headers={**m.headers, **carrier})
                for m in messages
            ]
        now = self._clock.now()
        rows = [
            {
                "id": m.id,
                "topic": m.topic,
                "key": m.key,
                "type": m.type,
                "envelope": m.to_json(),
                "created_at": now,
            }
            for m in messages
        ]
        signals = self._signals
        # The relay of this process wakes when the transaction commits; on PostgreSQL every other
        # process's too, by a NOTIFY riding in the same statement (no extra round trip) — unless a
        # relay runs in this process (the worker's saga moves): it relays these rows, woken here, and
        # the NOTIFY only woke it a second time through its listener (ADR 0083). Another process's
        # relay finds them by its safety poll if this one stops.
        notify = signals is not None and signals.cross_process and not signals.waited_on(OUTBOX_CHANNEL)
        if signals is not None:
            signals.after_commit(conn, OUTBOX_CHANNEL)
        return rows, notify


@dataclass(frozen=True, slots=True)
class StagedRows:
    """Outbox rows staged for a statement that inserts them after its own write (`Outbox.stage`):
    its parameters (`insert_after`'s names), how many rows, and whether it must NOTIFY the relays."""

    params: dict[str, Any]
    count: int
    notify: bool


def _params(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {f"{k}_{i}": v for i, row in enumerate(rows) for k, v in row.items()}


def insert_after(guard: CTE, count: int) -> Insert:
    """`INSERT INTO outbox … SELECT :id_0, … FROM guard UNION ALL …`: `count` staged rows
    (`StagedRows.params`), inserted once per row `guard` returns (a fenced write's RETURNING: one
    row when it matched, none when it did not, and then no message is written either). For a
    data-modifying CTE on PostgreSQL; `plain_insert(count)` is the same rows inserted outright."""
    rows = [
        select(*(bindparam(f"{name}_{i}", type_=outbox.c[name].type) for name in _COLUMNS)).select_from(guard)
        for i in range(count)
    ]
    return insert(outbox).from_select(list(_COLUMNS), rows[0] if count == 1 else union_all(*rows))


def plain_insert(count: int) -> Any:
    """The outbox insert of `count` staged rows on its own (no NOTIFY): what `insert_after` chains."""
    return _insert_statement(count, notify=False)


# One INSERT of n rows per batch size (a saga move or a handler adds one to a few), prepared once on
# the raw-driver layer; a bigger batch goes as several.
_ROWS_PER_INSERT = 64
# The most rows `Outbox.stage` hands to another statement (one insert's worth).
MAX_STAGED_ROWS = _ROWS_PER_INSERT
_INSERTS: dict[tuple[int, bool], Any] = {}
_COLUMNS = ("id", "topic", "key", "type", "envelope", "created_at")


def _insert_statement(count: int, *, notify: bool) -> Any:
    statement = _INSERTS.get((count, notify))
    if statement is None:
        values = [
            {name: bindparam(f"{name}_{i}", type_=outbox.c[name].type) for name in _COLUMNS}
            for i in range(count)
        ]
        built: Any = insert(outbox).values(values)
        if notify:
            # `SELECT pg_notify(...)` with the insert as a CTE: one statement, NOTIFY at commit.
            built = notify_statement(OUTBOX_CHANNEL).add_cte(built.cte("new_outbox_rows"))
        statement = _INSERTS[(count, notify)] = driver_prepared(built)
    return statement


@dataclass(frozen=True, slots=True)
class OutboxBacklog:
    messages: int
    oldest_age_s: float


class OutboxRelay:
    """Publishes committed outbox rows to a `Stream` (any `Publisher`).

    `relay_once` is a `PeriodicJob` callable (`PeriodicJob("outbox_relay", 0.5, relay.relay_once,
    batch=relay.batch_size)`); several relays may run against one PostgreSQL database.

    Order: rows are published in id (UUIDv7, creation) order. A relay skips rows whose key has an
    older unpublished row held by another relay, so two relays never publish one aggregate's
    events out of order; those rows wait for the next pass.
    """

    def __init__(
        self,
        db: Database,
        stream: Publisher,
        *,
        batch_size: int = 100,
        clock: Clock | None = None,
        lease_s: float = 30.0,
        hook: MessagingHook | None = None,
        backlog_interval_s: float = 5.0,
        announces: str | None = None,
    ) -> None:
        """`announces`: the work signal a pass that published fires, here and (PostgreSQL) in every
        process: by a NOTIFY riding in the pass's claim when the stream is the SQL log on `db`,
        else by `WorkSignals.announce` after the pass."""
        if batch_size < 1 or lease_s <= 0 or backlog_interval_s < 0:
            raise ValueError("batch_size must be >= 1, lease_s > 0 and backlog_interval_s >= 0")
        self._db = db
        self._stream = stream
        self.batch_size = batch_size
        self._clock = clock or SystemClock()
        self._lease = timedelta(seconds=lease_s)
        self._hook = hook or NullMessagingHook()
        self.backlog_interval_s = backlog_interval_s
        self._backlog_due = 0.0  # time.monotonic() of the next backlog gauge update
        self._idle = False  # the last pass claimed nothing
        self._reads = DriverReads(db)
        self.announces = announces
        # The SQL log on this same database: claim, append and mark in one transaction (ADR 0083).
        self._log = stream if isinstance(stream, ClaimingLog) and stream.database is db else None
        notify = announces is not None and self._log is not None and db.signals.cross_process
        self._claim_published = _claiming_published(announces if notify else None)

    async def relay_once(self) -> int:
        """One pass: claim, publish, mark. Returns how many messages were published.

        After a pass that found nothing, a read-only look comes first, so an idle relay (woken by
        its safety poll) takes no write lock and opens no write transaction."""
        if self._idle and not await self._any_unpublished():
            await self._report_backlog()
            return 0
        if self._log is not None:
            published = await self._relay_in_transaction(self._log)
            self._idle = not published
        else:
            published = await self._relay_leased()
        if published:
            self._hook.relay_published(count=published)
            await self._announce()
        await self._report_backlog()
        return published

    async def _relay_in_transaction(self, log: ClaimingLog) -> int:
        """Claim and mark published (one statement: the rows locked, `published_at` set), append,
        commit: one transaction. A failure rolls all of it back: the rows stay unpublished."""
        spans: list[Any] = []

        async def claim(executor: Executor) -> list[Message]:
            for span in spans:  # the transaction is being redone
                span.end()
            spans.clear()
            now = self._clock.now()
            params = {
                "now": now,
                "limit": self.batch_size,
                "published_at": now,
                "origin": self._db.signals.origin,
            }
            rows = await executor.rows(self._claim_published, params)
            claimed = [Message.from_json(row[1]) for row in sorted(rows, key=lambda row: row[0])]
            claimed, started = _producer_spans(claimed)
            spans.extend(started)
            return claimed

        try:
            published = await log.publish_claimed(claim)
        except BaseException as exc:
            _end_spans(spans, exc)
            raise
        _end_spans(spans, None)
        return len(published)

    async def _announce(self) -> None:
        if self.announces is None:
            return
        if self._log is not None:
            # The NOTIFY rode in the claim (PostgreSQL), and the log's commit woke this process's
            # readers of what was published (`SqlLogStream.publish_claimed`).
            return
        try:
            await self._db.signals.announce(self.announces)
        except Exception:  # noqa: BLE001 - the listeners' safety poll covers a lost announcement
            _log.warning("relay_announce_failed", exc_info=True)

    async def _relay_leased(self) -> int:
        """Claim under a lease (committed), publish to the stream, mark: any `Publisher`."""
        token = new_id()
        claimed = await self._claim(token)
        self._idle = not claimed
        if claimed:
            claimed, spans = _producer_spans(claimed)
            try:
                await self._stream.publish(claimed)
            except BaseException as exc:
                _end_spans(spans, exc)
                # Free the rows now rather than after the lease: the next pass retries at once.
                await self._release(token, [m.id for m in claimed], published=False)
                raise
            _end_spans(spans, None)
            await self._release(token, [m.id for m in claimed], published=True)
        return len(claimed)

    async def _any_unpublished(self) -> bool:
        return bool(await self._reads.rows(_ANY_UNPUBLISHED, {}))

    async def _report_backlog(self) -> None:
        # The gauge's count is a scan of the unpublished rows in a statement of its own: at most
        # once per interval, not on every pass (several per second when the relay is busy).
        if time.monotonic() >= self._backlog_due:
            self._backlog_due = time.monotonic() + self.backlog_interval_s
            backlog = await self.backlog()
            self._hook.outbox_backlog(messages=backlog.messages, oldest_age_s=backlog.oldest_age_s)

    async def _claim(self, token: uuid.UUID) -> list[Message]:
        """Pick, order check and lease in one statement (PostgreSQL evaluates the locking CTE once),
        committed on its own; the statement's snapshot sees what a separate order check would."""
        now = self._clock.now()
        params = {"now": now, "limit": self.batch_size, "until": now + self._lease, "token": token}
        async with self._db.autocommit() as conn:
            rows = await on_connection(conn).rows(_CLAIM, params)
        # RETURNING has no order: id (UUIDv7) order is the publishing order.
        return [Message.from_json(envelope) for _, envelope in sorted(rows, key=lambda row: row[0])]

    async def _release(self, token: uuid.UUID, ids: list[uuid.UUID], *, published: bool) -> None:
        # Only rows still under our lease: if it expired and another relay took over, that relay
        # owns them now (and has published or will publish them; the stream dedups). One statement
        # executed once for the whole batch (`id = ANY(...)`), prepared on the driver path: an
        # executemany of one UPDATE per row was one round trip but N executions in PostgreSQL.
        published_at = self._clock.now() if published else None
        async with self._db.autocommit() as conn:
            await on_connection(conn).run(
                _RELEASE, {"ids": ids, "token": token, "published_at": published_at}
            )

    async def backlog(self) -> OutboxBacklog:
        o = outbox.c
        async with self._db.read() as conn:
            count, oldest = (
                await conn.execute(
                    select(func.count(), func.min(o.created_at)).where(o.published_at.is_(None))
                )
            ).one()
        age = 0.0 if oldest is None else max((self._clock.now() - oldest).total_seconds(), 0.0)
        return OutboxBacklog(messages=int(count), oldest_age_s=age)

    async def purge_published(self, *, older_than_s: float, limit: int = 1000) -> int:
        """Delete up to `limit` rows published more than `older_than_s` seconds ago (retention)."""
        o = outbox.c
        cutoff = self._clock.now() - timedelta(seconds=older_than_s)
        async with self._db.write() as conn:
            ids = select(o.id).where(o.published_at < cutoff).order_by(o.id).limit(limit)
            result = await conn.execute(delete(outbox).where(o.id.in_(ids.scalar_subquery())))
        return int(result.rowcount)


_o = outbox.c
_ANY_UNPUBLISHED = driver_prepared(select(_o.id).where(_o.published_at.is_(None)).limit(1))


def _claiming() -> Any:
    return driver_prepared(
        update(outbox)
        .where(_o.id.in_(_free_candidates()))
        .values(
            claimed_until=bindparam("until", type_=_o.claimed_until.type),
            claim_token=bindparam("token", type_=_o.claim_token.type),
        )
        .returning(_o.id, _o.envelope)
    )


def _free_candidates() -> Any:
    """The oldest unpublished rows no relay holds (lease or row lock), up to `limit`, less those
    with an older unpublished row of their key that is not among them."""
    now = bindparam("now", type_=_o.claimed_until.type)
    candidates = (
        select(_o.id, _o.key)
        .where(_o.published_at.is_(None), _o.claimed_until.is_(None) | (_o.claimed_until < now))
        .order_by(_o.id)
        .limit(bindparam("limit", type_=Integer()))
        .with_for_update(skip_locked=True)
        .cte("candidates")
    )
    # A candidate waits when an older unpublished row of its key is not a candidate: another relay
    # holds it (lease or lock), so publishing ours now could overtake it.
    older = outbox.alias("older")
    free = select(candidates.c.id).where(
        ~exists().where(
            older.c.published_at.is_(None),
            older.c.key == candidates.c.key,
            older.c.id < candidates.c.id,
            older.c.id.not_in(select(candidates.c.id)),
        )
    )
    return free


_CLAIM = _claiming()
_CLAIMS_PUBLISHED: dict[str | None, Any] = {}


def _claiming_published(announces: str | None) -> Any:
    """`_CLAIM`'s pick and order check, the rows marked published instead of leased: for a claim
    that commits with its append (ADR 0083), its row locks held until then. With `announces`
    (PostgreSQL), the relays' NOTIFY rides in it: one per row claimed, which PostgreSQL folds into
    one at commit (same channel and payload), none when it claimed nothing."""
    statement = _CLAIMS_PUBLISHED.get(announces)
    if statement is None:
        claim = (
            update(outbox)
            .where(_o.id.in_(_free_candidates()))
            .values(published_at=bindparam("published_at", type_=_o.published_at.type))
        )
        if announces is None:
            built: Any = claim.returning(_o.id, _o.envelope)
        else:
            claimed = claim.returning(_o.id, _o.envelope).cte("claimed")
            notify = origin_notify_statement(announces).selected_columns
            built = select(claimed.c.id, claimed.c.envelope, *notify).select_from(claimed)
        statement = _CLAIMS_PUBLISHED[announces] = driver_prepared(built)
    return statement


class _HexIdList(TypeDecorator[list[uuid.UUID]]):
    """A list of ids bound as one JSON array of the 32-hex-digit text SQLite stores a `Uuid` as,
    for `json_each`: SQLite has no arrays."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: list[uuid.UUID] | None, dialect: Any) -> str | None:
        return None if value is None else json.dumps([i.hex for i in value])


def _releasing(picked: Any) -> Any:
    return (
        update(outbox)
        .where(picked, _o.claim_token == bindparam("token", type_=_o.claim_token.type))
        .values(
            claimed_until=None,
            claim_token=None,
            published_at=bindparam("published_at", type_=_o.published_at.type),
        )
    )


# The batch's ids in one parameter: an array on PostgreSQL (`id = ANY($1)`), a JSON array read by
# `json_each` on SQLite (the `in_turn` form `on_connection` runs there instead).
_HEX_IDS = func.json_each(bindparam("ids", type_=_HexIdList())).table_valued("value")
_RELEASE = driver_prepared(
    _releasing(_o.id == any_(bindparam("ids", type_=postgresql.ARRAY(_o.id.type)))),
    in_turn=[_releasing(_o.id.in_(select(_HEX_IDS.c.value)))],
)


def _end_spans(spans: list[Any], error: BaseException | None) -> None:
    for span in spans:
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()


def _producer_spans(messages: list[Message]) -> tuple[list[Message], list[Any]]:
    """A producer span per traced message, child of the context the row was written in; the message
    goes to the stream carrying the producer span's context, so its consumers are children of it."""
    out: list[Message] = []
    spans: list[Any] = []
    for message in messages:
        parent = context_from(message.headers)
        if parent is None:
            out.append(message)
            continue
        span = tracer().start_span(
            f"{message.topic} publish",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "mercato",
                "messaging.operation.type": "publish",
                "messaging.destination.name": message.topic,
                "messaging.message.id": str(message.id),
                "cloudevents.event_type": message.type,
            },
        )
        spans.append(span)
        out.append(dataclasses.replace(message, headers={**message.headers, **carrier_of(span)}))
    return out, spans
