"""Retention: what the messaging tables and streams may forget, and the one rule trimming keeps.

Three stores grow with every message: the outbox (published rows), the inbox (dedup records) and the
stream itself. `Outbox`/`OutboxRelay.purge_published` and `Inbox.purge` age the first two out; this
module trims the third, per topic partition, by time **and never below the slowest reader**:

    keep every entry appended at or after `before`, and every entry some reader still needs:
    floor = min(first entry at or after `before`,
                each consumer group's first unacknowledged entry (pending, or not yet delivered),
                each SQL-log projection's checkpoint (those read the log table by offset))

so a lagging consumer group (a worker down for a day) keeps its backlog however old, and only what
every group has acknowledged is ever dropped. A group that has never read a partition protects
nothing there: it starts at the oldest entry still kept. Dead letters are copies (their envelope is
stored with the letter), so trimming never loses one.

Backends:
- SQL log: per partition, a range delete on the primary key below the floor, in chunks of `limit`.
  Offsets come from `messaging_stream_heads`, so numbering goes on past a trimmed range.
- Redis Streams: one Lua script per partition computes the floor from `XINFO GROUPS` / `XPENDING`
  and runs `XTRIM MINID` atomically (no group can move between the look and the cut). The newest
  entry always stays: the publisher numbers the next offset from it.
- NATS JetStream: not trimmed here. JetStream's own limits (`max_age`, `max_msgs`) drop messages
  whatever the consumers' positions, which would break the rule above; an operator who wants them
  sets them on the stream knowingly (see ADR 0023). `trim_stream` returns 0 for it.

What retention costs (ADR 0023): a consumer group rewound (`replay`) before the kept range gets only
what is kept; the read models' rebuild replays from offset zero, so on a trimmed stream a rebuild
recreates only the kept window. Hence the stream's retention is off unless configured.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, delete, func, select

from mercato.kit.messaging.nats_jetstream import JetStreamStream
from mercato.kit.messaging.redis_streams import RedisStream
from mercato.kit.messaging.sql_log import SqlLogStream
from mercato.kit.messaging.stream import Stream
from mercato.kit.messaging.tables import stream_cursors, stream_heads, stream_log
from mercato.kit.storage import Database

__all__ = ["stream_floors", "trim_redis_stream", "trim_sql_log", "trim_stream"]

_Key = tuple[str, int]


async def trim_stream(stream: Stream, db: Database, *, before: datetime, limit: int = 1000) -> int:
    """Trim whichever backend `stream` is (`db`: the SQL log's database); how many entries were
    removed (see the module doc)."""
    if isinstance(stream, SqlLogStream):
        return await trim_sql_log(db, before=before, limit=limit)
    if isinstance(stream, RedisStream):
        return await trim_redis_stream(stream, before=before)
    if isinstance(stream, JetStreamStream):
        return 0
    raise TypeError(f"no trimming for {type(stream).__name__}")


async def stream_floors(db: Database) -> dict[_Key, int]:
    """The SQL log's lowest offset some reader still needs, per (topic, partition): the minimum of
    every group's cursor and every projection's checkpoint there; the head when nobody reads it."""
    # Imported here: projections sit above messaging in the kit (they import it), not below.
    from mercato.kit.projections.tables import projection_checkpoints

    h, c, p = stream_heads.c, stream_cursors.c, projection_checkpoints.c
    async with db.read() as conn:
        floors = {
            (str(t), int(n)): int(o)
            for t, n, o in await conn.execute(select(h.topic, h.partition, h.next_offset))
        }
        for topic, partition, lowest in await conn.execute(
            select(c.topic, c.partition, func.min(c.next_offset)).group_by(c.topic, c.partition)
        ):
            key = (str(topic), int(partition))
            if key in floors:
                floors[key] = min(floors[key], int(lowest))
        for topic, partition, lowest in await conn.execute(
            select(p.topic, p.partition, func.min(p.position)).group_by(p.topic, p.partition)
        ):
            key = (str(topic), int(partition))
            if key in floors:
                floors[key] = min(floors[key], int(lowest))
    return floors


async def trim_sql_log(db: Database, *, before: datetime, limit: int = 1000) -> int:
    """Delete up to `limit` log rows per partition that are older than `before` and below every
    reader's position; returns how many were deleted. Run it again while it returns a full batch."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    log = stream_log.c
    removed = 0
    for (topic, partition), floor in sorted((await stream_floors(db)).items()):
        in_partition = and_(log.topic == topic, log.partition == partition)
        async with db.write() as conn:
            lowest, recent = (
                await conn.execute(
                    select(
                        func.min(log.offset),
                        select(func.min(log.offset))
                        .where(in_partition, log.appended_at >= before)
                        .scalar_subquery(),
                    ).where(in_partition)
                )
            ).one()
            if lowest is None:
                continue
            # Offsets and append times grow together: everything below the first recent row is old.
            cut = min(floor, int(recent) if recent is not None else floor, int(lowest) + limit)
            if cut <= int(lowest):
                continue
            result = await conn.execute(delete(stream_log).where(in_partition, log.offset < cut))
            removed += int(result.rowcount)
    return removed


# KEYS[1]: one partition's stream. ARGV[1]: the retention cutoff in ms. Returns entries removed.
_TRIM = """
local key = KEYS[1]
local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
if not last then return 0 end
local function parse(id)
  local ms, s = string.match(id, '^(%d+)-(%d+)$')
  return {tonumber(ms), tonumber(s)}
end
local function less(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end
-- Never the newest entry: the next publish numbers its offset from it.
local floor = parse(last[1])
local cutoff = {tonumber(ARGV[1]), 0}
if less(cutoff, floor) then floor = cutoff end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  local h = {}
  for i = 1, #g, 2 do h[g[i]] = g[i + 1] end
  local keep
  if tonumber(h['pending']) > 0 then
    -- The oldest delivered-but-unacknowledged entry: it may be delivered again.
    keep = parse(redis.call('XPENDING', key, h['name'])[2])
  else
    -- Everything up to the last delivered entry is acknowledged; keep what follows it.
    local d = parse(h['last-delivered-id'])
    if d[2] >= 9007199254740992 then keep = {d[1] + 1, 0} else keep = {d[1], d[2] + 1} end
  end
  if less(keep, floor) then floor = keep end
end
return redis.call('XTRIM', key, 'MINID', string.format('%.0f-%.0f', floor[1], floor[2]))
"""


async def trim_redis_stream(
    stream: RedisStream, *, before: datetime, topics: Sequence[str] | None = None
) -> int:
    """`XTRIM MINID` each partition of `topics` (default: every stream under the prefix) to the floor
    the script computes; returns how many entries were removed."""
    client = stream.client
    script = client.register_script(_TRIM)
    cutoff_ms = int(before.timestamp() * 1000)
    if topics is None:
        keys = [key async for key in client.scan_iter(match=f"{stream.prefix}:*", count=1000, _type="stream")]
    else:
        keys = [f"{stream.prefix}:{topic}:{p}" for topic in topics for p in range(stream.partitions)]
    removed = 0
    for key in sorted(keys):
        removed += int(await script(keys=[key], args=[cutoff_ms]))
    return removed
