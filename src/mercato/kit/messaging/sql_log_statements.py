"""The SQL log's statements, built once: SQLAlchemy then reuses their compiled form without
rebuilding the expression and its cache key per call. Each is registered for the driver path."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Insert,
    Integer,
    Select,
    Update,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    null,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from mercato.kit.messaging.stream import (
    DeadLetterStatus,
)
from mercato.kit.messaging.tables import (
    dead_letters,
    stream_attempts,
    stream_cursors,
    stream_heads,
    stream_log,
)
from mercato.kit.storage.statements import driver_prepared

# The statements of every publish and read, built once: SQLAlchemy then reuses their compiled
# form without rebuilding the expression and its cache key per call.
_h, _c, _log, _a = stream_heads.c, stream_cursors.c, stream_log.c, stream_attempts.c

_MOVE_HEAD = (
    update(stream_heads)
    .where(_h.topic == bindparam("b_topic"), _h.partition == bindparam("b_partition"))
    .values(next_offset=bindparam("next_offset_value"))
)
_APPEND = insert(stream_log)
_STORED_IDS_CHUNK = 100

# The poll's first, autocommitted look (no transaction): every partition's head next to the group's
# cursor, and whether a replayed dead letter is due. Most polls of an idle group end here.
_PROBE = (
    select(
        _h.partition,
        _h.next_offset,
        _c.next_offset,
        _c.batch_end,
        _c.lease_until,
        exists()
        .where(
            dead_letters.c.group == bindparam("group"),
            dead_letters.c.topic == bindparam("topic"),
            dead_letters.c.status == DeadLetterStatus.REPLAYING.value,
            dead_letters.c.visible_at.is_(None) | (dead_letters.c.visible_at <= bindparam("now")),
        )
        .label("replays_due"),
    )
    .select_from(
        stream_heads.outerjoin(
            stream_cursors,
            and_(_c.group == bindparam("group"), _c.topic == _h.topic, _c.partition == _h.partition),
        )
    )
    .where(_h.topic == bindparam("topic"))
)
_done = func.coalesce(_c.next_offset, 0)
_LAG = (
    select(func.coalesce(func.sum(case((_h.next_offset > _done, _h.next_offset - _done), else_=0)), 0))
    .select_from(
        stream_heads.outerjoin(
            stream_cursors,
            and_(_c.group == bindparam("group"), _c.topic == _h.topic, _c.partition == _h.partition),
        )
    )
    .where(_h.topic == bindparam("topic"))
)

_LOCK_CURSORS = (
    select(_c.partition, _c.next_offset, _c.batch_end, _c.owner, _c.lease_until)
    .where(_c.group == bindparam("group"), _c.topic == bindparam("topic"))
    .order_by(_c.partition)
    .with_for_update(skip_locked=True)
)
# The log with the group's record of each message (none for most).
_LOG_WITH_ATTEMPTS = stream_log.outerjoin(
    stream_attempts,
    and_(
        _a.group == bindparam("group"),
        _a.topic == _log.topic,
        _a.partition == _log.partition,
        _a.offset == _log.offset,
    ),
)
# The next messages of a partition with the group's record of each.
_NEXT_BATCH = (
    select(_log.offset, _log.envelope, _a.failures, _a.acked)
    .select_from(_LOG_WITH_ATTEMPTS)
    .where(
        _log.topic == bindparam("topic"),
        _log.partition == bindparam("partition"),
        _log.offset >= bindparam("from_offset"),
    )
    .order_by(_log.offset)
    .limit(bindparam("limit"))
)
_d = dead_letters.c
# Dead letters queued for the group again whose (re)delivery is due.
_REPLAYS = (
    select(_d.id, _d.partition, _d.offset, _d.envelope, _d.attempts)
    .where(
        _d.group == bindparam("group"),
        _d.topic == bindparam("topic"),
        _d.status == DeadLetterStatus.REPLAYING.value,
        _d.visible_at.is_(None) | (_d.visible_at <= bindparam("now")),
    )
    .order_by(_d.id)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)
_SET_CURSOR = (
    update(stream_cursors)
    .where(
        _c.group == bindparam("b_group"),
        _c.topic == bindparam("b_topic"),
        _c.partition == bindparam("b_partition"),
    )
    .values(
        next_offset=bindparam("next_offset_value"),
        batch_end=bindparam("batch_end_value"),
        owner=bindparam("owner_value"),
        lease_until=bindparam("lease_until_value"),
    )
)


class _Probe(NamedTuple):
    heads: dict[int, int]
    # Partitions the group has no cursor for yet.
    missing: list[int]
    replays: bool


class _Cursor(NamedTuple):
    next_offset: int
    batch_end: int
    lease_until: datetime | None


# The in-order ack (see `SqlLogStream._ack_in_order`). Both engines evaluate SET expressions on
# the row's old values, so `lease_until` is cleared exactly when this ack completes the batch (its
# end is the new watermark).
_ACK_IN_ORDER = (
    update(stream_cursors)
    .where(
        _c.group == bindparam("b_group"),
        _c.topic == bindparam("b_topic"),
        _c.partition == bindparam("b_partition"),
        _c.next_offset == bindparam("b_offset"),
        _c.batch_end > bindparam("b_offset"),
        _c.owner == bindparam("b_owner"),
        _c.lease_until == bindparam("b_lease"),
        ~exists().where(
            _a.group == bindparam("b_group"),
            _a.topic == bindparam("b_topic"),
            _a.partition == bindparam("b_partition"),
            _a.offset >= bindparam("b_offset"),
        ),
    )
    .values(
        next_offset=bindparam("b_next"),
        lease_until=case((_c.batch_end == bindparam("b_next"), null()), else_=_c.lease_until),
    )
    .returning(_c.next_offset)
)


_STORED_IDS_STATEMENTS: dict[int, Select[tuple[uuid.UUID]]] = {}
_ALLOCATE_STATEMENTS: dict[tuple[str, int], Insert] = {}


def _allocate_heads(dialect: str, count: int) -> Insert:
    """Reserve offsets on `count` partitions in one statement: each head (`t0`, `p0`, `n0`...) moves
    by its batch's size, created at that size if new, and comes back as the new head.

    The upsert takes the head rows' locks as a SELECT ... FOR UPDATE did, in VALUES order (the
    caller sorts the partitions, so concurrent publishers lock in one order and cannot deadlock),
    and holds them to commit: offsets of a partition still commit in offset order."""
    statement = _ALLOCATE_STATEMENTS.get((dialect, count))
    if statement is None:
        dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        values = dialect_insert(stream_heads).values(
            [
                {
                    "topic": bindparam(f"t{n}", type_=_h.topic.type),
                    "partition": bindparam(f"p{n}", type_=Integer()),
                    "next_offset": bindparam(f"n{n}", type_=BigInteger()),
                }
                for n in range(count)
            ]
        )
        statement = values.on_conflict_do_update(
            index_elements=["topic", "partition"],
            set_={"next_offset": _h.next_offset + values.excluded.next_offset},
        ).returning(_h.topic, _h.partition, _h.next_offset)
        _ALLOCATE_STATEMENTS[(dialect, count)] = statement
        driver_prepared(statement)
    return statement


def _stored_ids(count: int) -> Select[tuple[uuid.UUID]]:
    """Which of `count` message ids (`id0`...) the log holds: one statement per batch size, so its
    compiled form is reused (an expanding IN is rendered anew on every call)."""
    statement = _STORED_IDS_STATEMENTS.get(count)
    if statement is None:
        statement = select(_log.message_id).where(
            _log.message_id.in_([bindparam(f"id{n}", type_=_log.message_id.type) for n in range(count)])
        )
        _STORED_IDS_STATEMENTS[count] = statement
        driver_prepared(statement)
    return statement


for _statement in (
    _MOVE_HEAD,
    _APPEND,
    _PROBE,
    _LAG,
    _LOCK_CURSORS,
    _NEXT_BATCH,
    _REPLAYS,
    _SET_CURSOR,
    _ACK_IN_ORDER,
):
    driver_prepared(_statement)


# A consumer's batch touches several partitions: the statements below do for all of them what
# `_NEXT_BATCH`, `_SET_CURSOR` and `_ACK_IN_ORDER` do for one, in one round trip (ADR 0073). One
# statement per partition count, built and registered once; each partition's values are bound as
# `<name><i>` and picked by a CASE on the row's partition.
_NEXT_BATCHES: dict[int, Select[Any]] = {}
_SET_CURSORS: dict[int, Update] = {}
_ACKS_IN_ORDER: dict[int, Update] = {}


def _per_partition(count: int, name: str, type_: Any) -> Any:
    """The value bound as `<name><i>` for the row of partition `p<i>`."""
    return case(
        *[
            (_c.partition == bindparam(f"p{i}", type_=Integer()), bindparam(f"{name}{i}", type_=type_))
            for i in range(count)
        ]
    )


def _partitions(count: int) -> Any:
    return _c.partition.in_([bindparam(f"p{i}", type_=Integer()) for i in range(count)])


def _next_batches(count: int) -> Select[Any]:
    """`_NEXT_BATCH` of `count` partitions (`p<i>` from `from<i>`, up to `limit` messages each):
    (partition, offset, envelope, failures, acked) rows, in offset order within a partition."""
    statement = _NEXT_BATCHES.get(count)
    if statement is None:
        arms = []
        for i in range(count):
            partition = bindparam(f"p{i}", type_=Integer())
            arm = (
                select(_log.partition, _log.offset, _log.envelope, _a.failures, _a.acked)
                .select_from(_LOG_WITH_ATTEMPTS)
                .where(
                    _log.topic == bindparam("topic"),
                    _log.partition == partition,
                    _log.offset >= bindparam(f"from{i}", type_=BigInteger()),
                )
                .order_by(_log.offset)
                .limit(bindparam("limit", type_=Integer()))
                .subquery(f"p{i}")
            )
            arms.append(select(arm))
        built: Any = arms[0] if count == 1 else union_all(*arms)
        statement = _NEXT_BATCHES[count] = driver_prepared(built)
    return statement


def _set_cursors(count: int) -> Update:
    """`_SET_CURSOR` of `count` partitions of one group and topic: `n<i>`, `e<i>`, `o<i>`, `l<i>`
    the next offset, batch end, owner and lease of partition `p<i>`."""
    statement = _SET_CURSORS.get(count)
    if statement is None:
        statement = _SET_CURSORS[count] = driver_prepared(
            update(stream_cursors)
            .where(_c.group == bindparam("b_group"), _c.topic == bindparam("b_topic"), _partitions(count))
            .values(
                next_offset=_per_partition(count, "n", BigInteger()),
                batch_end=_per_partition(count, "e", BigInteger()),
                owner=_per_partition(count, "o", _c.owner.type),
                lease_until=_per_partition(count, "l", _c.lease_until.type),
            )
        )
    return statement


def _acks_in_order(count: int) -> Update:
    """`_ACK_IN_ORDER` of one run of offsets in each of `count` partitions held by one consumer:
    partition `p<i>`'s watermark moves from `f<i>` to `n<i>` where its batch is still out under
    lease `l<i>` and no failure or out-of-order ack is recorded at or after `f<i>`. RETURNING the
    partitions it moved; the others take the general path."""
    statement = _ACKS_IN_ORDER.get(count)
    if statement is None:
        first = _per_partition(count, "f", BigInteger())
        next_offset = _per_partition(count, "n", BigInteger())
        statement = _ACKS_IN_ORDER[count] = driver_prepared(
            update(stream_cursors)
            .where(
                _c.group == bindparam("b_group"),
                _c.topic == bindparam("b_topic"),
                _partitions(count),
                _c.next_offset == first,
                _c.batch_end > first,
                _c.owner == bindparam("b_owner"),
                _c.lease_until == _per_partition(count, "l", _c.lease_until.type),
                ~exists().where(
                    _a.group == bindparam("b_group"),
                    _a.topic == bindparam("b_topic"),
                    _a.partition == _c.partition,
                    _a.offset >= first,
                ),
            )
            .values(
                next_offset=next_offset,
                lease_until=case((_c.batch_end == next_offset, null()), else_=_c.lease_until),
            )
            .returning(_c.partition)
        )
    return statement
