"""The projector's statements, built once and registered for the raw-driver layer
(kit/storage/statements.py), and how a pass cuts its batch into one offset range per partition."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import Select, and_, bindparam, case, or_, select, union_all, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import ClauseElement

from mercato.kit.messaging.tables import stream_heads, stream_log
from mercato.kit.projections.tables import projection_checkpoints
from mercato.kit.storage.statements import driver_prepared

__all__ = [
    "LOCK_CHECKPOINT",
    "SAVE_CHECKPOINT",
    "Key",
    "advance_statement",
    "cut_ranges",
    "probe_statement",
    "read_ranges_statement",
    "size_class",
]

Key = tuple[str, int]


_PROBES: dict[int, Select[tuple[str, int, int, int | None]]] = {}


def probe_statement(topics: int) -> Select[tuple[str, int, int, int | None]]:
    """Each partition's head next to the projection's position in it (NULL: no checkpoint row
    yet): the lag, and whether a pass has anything to do, in one autocommitted statement. One per
    topic count (the projection's name and topics are parameters), prepared once."""
    statement = _PROBES.get(topics)
    if statement is None:
        h, c = stream_heads.c, projection_checkpoints.c
        statement = _PROBES[topics] = driver_prepared(
            select(h.topic, h.partition, h.next_offset, c.position)
            .select_from(
                stream_heads.outerjoin(
                    projection_checkpoints,
                    and_(c.name == bindparam("name"), c.topic == h.topic, c.partition == h.partition),
                )
            )
            .where(h.topic.in_([bindparam(f"topic{n}", type_=h.topic.type) for n in range(topics)]))
        )
    return statement


# The rebuild's and the broker projector's statements (the checkpoint's lock and save), built
# once and sent on the raw-driver layer inside the pass's transaction (kit/storage/statements.py).
_cp = projection_checkpoints.c
LOCK_CHECKPOINT = driver_prepared(
    select(_cp.topic, _cp.partition, _cp.position)
    .where(_cp.name == bindparam("name", type_=_cp.name.type))
    .order_by(_cp.topic, _cp.partition)
    .with_for_update()
)
# Both dialects spell the upsert alike (SQLite's is PostgreSQL's syntax); each compiles it once.
_SAVE_INSERT = postgresql.insert(projection_checkpoints).values(
    {
        name: bindparam(name, type_=_cp[name].type)
        for name in ("name", "topic", "partition", "position", "updated_at")
    }
)
SAVE_CHECKPOINT = driver_prepared(
    _SAVE_INSERT.on_conflict_do_update(
        index_elements=["name", "topic", "partition"],
        set_={"position": _SAVE_INSERT.excluded.position, "updated_at": _SAVE_INSERT.excluded.updated_at},
    )
)


# A pass's reads of every partition with work in one statement: one range scan on the log's primary
# key per partition, `UNION ALL`ed (bind parameters t<n>, p<n>, f<n> (from), u<n> (until)). One
# per partition count, prepared once (a projection reads at most topics x partitions of them).
_READ_RANGES: dict[int, ClauseElement] = {}


def read_ranges_statement(count: int) -> ClauseElement:
    statement = _READ_RANGES.get(count)
    if statement is None:
        log = stream_log.c
        branches = [
            select(log.topic, log.partition, log.offset, log.envelope).where(
                log.topic == bindparam(f"t{n}", type_=log.topic.type),
                log.partition == bindparam(f"p{n}", type_=log.partition.type),
                log.offset >= bindparam(f"f{n}", type_=log.offset.type),
                log.offset < bindparam(f"u{n}", type_=log.offset.type),
            )
            for n in range(count)
        ]
        statement = _READ_RANGES[count] = driver_prepared(branches[0] if count == 1 else union_all(*branches))
    return statement


# A live pass's claim on its ranges, in one statement: each partition's checkpoint moves from the
# position the probe saw (o<n>) to the end of the range it will apply (n<n>), only where it is still
# there (compare-and-set); the rows it returns are the partitions this pass owns until commit. A
# partition another projector of the same projection moved meanwhile is left out (it waits on that
# one's row lock, then finds the position changed). One per partition count, prepared once.
_ADVANCE: dict[int, ClauseElement] = {}


def advance_statement(count: int) -> ClauseElement:
    statement = _ADVANCE.get(count)
    if statement is None:
        keys = [
            and_(
                _cp.topic == bindparam(f"t{n}", type_=_cp.topic.type),
                _cp.partition == bindparam(f"p{n}", type_=_cp.partition.type),
            )
            for n in range(count)
        ]
        statement = _ADVANCE[count] = driver_prepared(
            update(projection_checkpoints)
            .where(
                _cp.name == bindparam("name", type_=_cp.name.type),
                or_(
                    *(
                        and_(key, _cp.position == bindparam(f"o{n}", type_=_cp.position.type))
                        for n, key in enumerate(keys)
                    )
                ),
            )
            .values(
                position=case(
                    *((key, bindparam(f"n{n}", type_=_cp.position.type)) for n, key in enumerate(keys)),
                    else_=_cp.position,
                ),
                updated_at=bindparam("now", type_=_cp.updated_at.type),
            )
            .returning(_cp.topic, _cp.partition, _cp.position)
        )
    return statement


def cut_ranges(
    positions: Mapping[Key, int], heads: Mapping[Key, int], limit: int, start: int
) -> dict[Key, tuple[int, int]]:
    """Up to `limit` messages past `positions`, as one [from, until) offset range per partition:
    shared out one message a partition at a time, the partitions in turn from the `start`-th, so a
    busy partition cannot starve the others. A partition's offsets are dense (the stream hands back
    the offsets of a duplicate it did not store) and below the head all committed (appended with it),
    so a range holds exactly until - from messages."""
    keys = sorted(k for k, position in positions.items() if position < heads.get(k, 0))
    if not keys:
        return {}
    first = start % len(keys)
    keys = keys[first:] + keys[:first]
    backlog = {k: heads[k] - positions[k] for k in keys}
    share = dict.fromkeys(keys, 0)
    left = min(limit, sum(backlog.values()))
    while left:
        open_keys = [k for k in keys if share[k] < backlog[k]]
        even = max(1, left // len(open_keys))
        for key in open_keys:
            take = min(even, backlog[key] - share[key], left)
            share[key] += take
            left -= take
            if not left:
                break
    return {k: (positions[k], positions[k] + share[k]) for k in keys if share[k]}


def size_class(count: int) -> int:
    """The smallest power of two >= `count`: the sizes the statements above are prepared for."""
    size = 1
    while size < count:
        size *= 2
    return size
