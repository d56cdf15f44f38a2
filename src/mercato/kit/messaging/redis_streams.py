"""`RedisStream`: the `Stream` port on Redis Streams (Redis 7). Layout, for a key prefix `P`:

- `P:<topic>:<partition>`: one Redis stream per partition. An entry's id is `<ms>-<offset>`: the
  publisher clock's milliseconds (never going backwards within the partition) and the partition's
  dense offset, so replay by time is `XGROUP SETID <ms-1>-max` and `Delivery.offset` is the id's
  sequence part. Fields: `id` (the message id) and `env` (the CloudEvents JSON).
- `P:<topic>:id:<message id>`: the publish dedup marker, `SET NX` with a TTL (`dedup_window_s`).
- Consumer groups are Redis consumer groups, one per (group, partition key). The group's pending
  entries list (PEL) is the outstanding batch; its per-entry delivery counter *is* the attempt number:
  we set it explicitly with `XCLAIM ... RETRYCOUNT` so an ordering revoke never counts as a failure.
- `P:dlq:<letter id>` (hash) + `P:dlq` (index) hold dead letters; `P:dlq:replay:<topic>:<group>`
  (sorted set, score = visible-at ms) queues the ones being replayed to their group.

Per-partition order: every read runs one Lua script over the topic's partitions, atomically. A
partition is served only when the group has no live pending entry there: the first pending entry
(the oldest) decides. Owned by a consumer and idle less than the visibility timeout: the batch is
out, skip. Idle longer: the consumer died; the first entry is charged a failed attempt (dead-lettered
at the limit) and the whole PEL is claimed for the caller, in id order, before any new entry. Owned
by the `~released` pseudo-consumer (a nack released it): redelivered without a further charge once
`retry_delay_s` passed. So a partition has at most one batch out per group, across processes.
Visibility is Redis's own idle time (the server clock), the same for every consumer process.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from redis.asyncio import Redis

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.ids import new_id
from mercato.kit.messaging.hooks import MessagingHook, NullMessagingHook
from mercato.kit.messaging.message import Message, partition_for
from mercato.kit.messaging.redis_streams_scripts import ACK as _ACK
from mercato.kit.messaging.redis_streams_scripts import ACK_MANY as _ACK_MANY
from mercato.kit.messaging.redis_streams_scripts import LAG as _LAG
from mercato.kit.messaging.redis_streams_scripts import REPLAY_LETTERS as _REPLAY_LETTERS
from mercato.kit.messaging.redis_streams_scripts import SETTLE_REPLAY as _SETTLE_REPLAY
from mercato.kit.messaging.redis_streams_scripts import append_ack_read_script, replay_script
from mercato.kit.messaging.stream import (
    DEAD_LETTER_RECEIPT_PREFIX,
    DeadLetter,
    DeadLetterStatus,
    Delivery,
    check_replay_start,
    poll_read,
)

__all__ = ["RedisStream"]

_DLQ_RECEIPT = DEAD_LETTER_RECEIPT_PREFIX
# Pending entries looked at per partition; a group never has more out than its reads asked for.
_MAX_PENDING = 10_000

# `append_ack_read`'s read in the same round trip: (topic, group, consumer, max_messages).
ReadNext = tuple[str, str, str, int]

_COMMON = """
local RELEASED = '~released'
local function seq_of(id) local _, s = string.match(id, '^(%d+)-(%d+)$') return tonumber(s) end
local function field(fields, name)
  for i = 1, #fields, 2 do if fields[i] == name then return fields[i + 1] end end
  return nil
end
local function dead_letter(key, group, topic, p, id, attempts, err, letter_key, index_key, letter_id, now_iso)
  local e = redis.call('XRANGE', key, id, id)
  if e[1] then
    redis.call('HSET', letter_key, 'id', letter_id, 'group', group, 'topic', topic, 'partition', p,
      'offset', seq_of(id), 'envelope', field(e[1][2], 'env'), 'attempts', attempts, 'last_error', err,
      'dead_at', now_iso, 'status', 'dead', 'replayed_at', '')
    redis.call('ZADD', index_key, 0, letter_id)
  end
  redis.call('XACK', key, group, id)
end
"""

# KEYS: stream keys (k of them), then one dedup key per message.
# ARGV: now_ms, ttl_s, k, then (stream key index, envelope) per message.
_PUBLISH = """
local now_ms, ttl, k = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local heads = {}
local added = 0
for m = 1, #KEYS - k do
  local ki = tonumber(ARGV[2 + 2 * m])
  local key = KEYS[ki]
  if redis.call('SET', KEYS[k + m], '1', 'NX', 'EX', ttl) then
    local head = heads[ki]
    if head == nil then
      local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
      if last[1] then
        local ms, s = string.match(last[1][1], '^(%d+)-(%d+)$')
        head = {tonumber(ms), tonumber(s)}
      else
        head = {0, -1}
      end
    end
    -- Offsets stay dense; the time part never goes backwards, so ids keep increasing.
    head = {math.max(head[1], now_ms), head[2] + 1}
    heads[ki] = head
    local id = string.format('%.0f-%.0f', head[1], head[2])
    local mid = string.sub(KEYS[k + m], -36)
    redis.call('XADD', key, id, 'id', mid, 'env', ARGV[3 + 2 * m])
    added = added + 1
  end
end
return added
"""

# KEYS: partition stream keys in partition order, then the group's DLQ replay queue.
# ARGV: group, consumer, budget, visibility_ms, max_attempts, retry_delay_ms, start, topic,
#       dlq prefix, now_iso, then one spare letter id per partition.
_READ = (
    _COMMON
    + """
local group, consumer = ARGV[1], ARGV[2]
local budget, vis_ms, max_attempts = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local retry_ms, start, topic, dlq, now_iso = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8], ARGV[9], ARGV[10]
local n = #KEYS - 1
local out = {}
local dead = 0
local t = redis.call('TIME')
local server_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Dead letters being replayed come first: an operator asked for them.
local replay_key = KEYS[n + 1]
for _, lid in ipairs(redis.call('ZRANGEBYSCORE', replay_key, '-inf', server_ms, 'LIMIT', 0, budget)) do
  local h = redis.call('HMGET', dlq .. ':' .. lid, 'status', 'partition', 'offset', 'envelope', 'attempts')
  if h[1] == 'replaying' then
    redis.call('ZADD', replay_key, server_ms + vis_ms, lid)
    table.insert(out, {'dlq', tonumber(h[2]), tonumber(h[3]), tonumber(h[5]) + 1, h[4], lid})
    budget = budget - 1
  else
    redis.call('ZREM', replay_key, lid)
  end
end
for step = 0, n - 1 do
  if budget <= 0 then break end
  local p = (start + step) % n
  local key = KEYS[p + 1]
  local pend = redis.pcall('XPENDING', key, group, '-', '+', %(max_pending)d)
  if type(pend) == 'table' and pend.err then
    redis.call('XGROUP', 'CREATE', key, group, '0', 'MKSTREAM')
    pend = {}
  end
  local serve = true
  if #pend > 0 then
    local first = pend[1]
    if first[2] == RELEASED then
      serve = first[3] >= retry_ms
    elseif first[3] < vis_ms then
      serve = false
    elseif first[4] >= max_attempts then
      dead_letter(key, group, topic, p, first[1], first[4],
        'visibility timeout expired (consumer ' .. first[2] .. ')',
        dlq .. ':' .. ARGV[10 + p + 1], dlq, ARGV[10 + p + 1], now_iso)
      dead = dead + 1
      table.remove(pend, 1)
    else
      first[4] = first[4] + 1
    end
  end
  if serve then
    local claimed_all = true
    for _, e in ipairs(pend) do
      if budget > 0 then
        local got = redis.call('XCLAIM', key, group, consumer, 0, e[1], 'RETRYCOUNT', e[4])
        if got[1] and got[1][2] then
          table.insert(out, {'log', p, seq_of(e[1]), e[4], field(got[1][2], 'env'), e[1]})
          budget = budget - 1
        end
      else
        -- Beyond this read's budget: parked as released, so they are not charged for a timeout.
        redis.call('XCLAIM', key, group, RELEASED, 0, e[1], 'RETRYCOUNT', e[4], 'JUSTID')
        claimed_all = false
      end
    end
    if claimed_all and budget > 0 then
      local got = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', budget, 'STREAMS', key, '>')
      if got and got[1] then
        for _, e in ipairs(got[1][2]) do
          table.insert(out, {'log', p, seq_of(e[1]), 1, field(e[2], 'env'), e[1]})
          budget = budget - 1
        end
      end
    end
  end
end
return {dead, out}
"""
).replace("%(max_pending)d", str(_MAX_PENDING))

# KEYS: the stream key. ARGV: group, consumer, entry id, attempt, max_attempts, error, topic,
#       partition, dlq prefix, letter id, now_iso.
_NACK = (
    _COMMON
    + """
local key, group, consumer, id, attempt = KEYS[1], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local e = redis.call('XPENDING', key, group, id, id, 1)
if e[1] == nil or e[1][2] ~= consumer or e[1][4] ~= attempt then return -1 end
local dead = 0
if attempt >= tonumber(ARGV[5]) then
  dead_letter(key, group, ARGV[7], tonumber(ARGV[8]), id, attempt, ARGV[6], ARGV[9] .. ':' .. ARGV[10],
    ARGV[9], ARGV[10], ARGV[11])
  dead = 1
else
  redis.call('XCLAIM', key, group, RELEASED, 0, id, 'RETRYCOUNT', attempt + 1, 'JUSTID')
end
-- Revoke the rest of the batch: it comes again after this message, in order, uncharged.
for _, p in ipairs(redis.call('XPENDING', key, group, '-', '+', %(max_pending)d)) do
  if p[2] ~= RELEASED then
    redis.call('XCLAIM', key, group, RELEASED, 0, p[1], 'RETRYCOUNT', p[4], 'JUSTID')
  end
end
return dead
"""
).replace("%(max_pending)d", str(_MAX_PENDING))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStream:
    """The `Stream` port on Redis Streams. Configuration applies to every topic and group it serves.

    `partitions` must stay fixed for a topic's life. `visibility_timeout_s` is measured by Redis
    (a pending entry's idle time), so every consumer process agrees on it. `dedup_window_s` is how
    long a published message id is remembered: a republish after it is stored again. `clock` stamps
    entries (replay by time) and dead letters. Entries are never trimmed: retention is an operator's
    `XTRIM MINID`, which keeps offsets valid.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "mercato:stream",
        partitions: int = 8,
        visibility_timeout_s: float = 30.0,
        max_attempts: int = 5,
        retry_delay_s: float = 0.0,
        poll_interval_s: float = 0.05,
        dedup_window_s: int = 86_400,
        clock: Clock | None = None,
        hook: MessagingHook | None = None,
    ) -> None:
        if partitions < 1 or max_attempts < 1 or visibility_timeout_s <= 0 or dedup_window_s < 1:
            raise ValueError(
                "partitions, max_attempts and dedup_window_s must be >= 1, visibility_timeout_s > 0"
            )
        self._redis = self.client = redis  # `client`: housekeeping (kit.messaging.retention) uses it
        self.prefix = prefix
        self.partitions = partitions
        self.visibility_timeout_s = visibility_timeout_s
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s
        self.poll_interval_s = poll_interval_s
        self.dedup_window_s = dedup_window_s
        self._clock = clock or SystemClock()
        self._hook = hook or NullMessagingHook()
        self._publish = redis.register_script(_PUBLISH)
        self._read = redis.register_script(_READ)
        self._ack = redis.register_script(_ACK)
        self._ack_many = redis.register_script(_ACK_MANY)
        self._append_ack_read = redis.register_script(append_ack_read_script(_COMMON, _READ))
        self._nack = redis.register_script(_NACK)
        self._settle = redis.register_script(_SETTLE_REPLAY)
        self._replay_letters = redis.register_script(_REPLAY_LETTERS)
        self._replay = redis.register_script(replay_script(_COMMON))
        self._lag = redis.register_script(_LAG)
        self._next_start = 0

    # ---- keys ----------------------------------------------------------------------------------

    def _key(self, topic: str, partition: int) -> str:
        return f"{self.prefix}:{topic}:{partition}"

    def _keys(self, topic: str) -> list[str]:
        return [self._key(topic, p) for p in range(self.partitions)]

    @property
    def _dlq(self) -> str:
        return f"{self.prefix}:dlq"

    def _replay_queue(self, topic: str, group: str) -> str:
        return f"{self._dlq}:replay:{topic}:{group}"

    def _now_ms(self) -> int:
        return int(self._clock.now().timestamp() * 1000)

    def _now_iso(self) -> str:
        return self._clock.now().isoformat()

    # ---- publishing ----------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        """One script call for the whole batch: dedup check and XADD are atomic per message, so
        concurrent publishers of one id store it once. Redis replies after the write reached the
        AOF (with `appendfsync always`, after the fsync): a returned publish is durable."""
        if not messages:
            return
        stream_keys: dict[str, int] = {}
        dedup_keys: list[str] = []
        args: list[Any] = []
        for message in messages:
            key = self._key(message.topic, partition_for(message.key, partitions=self.partitions))
            index = stream_keys.setdefault(key, len(stream_keys) + 1)
            dedup_keys.append(f"{self.prefix}:{message.topic}:id:{message.id}")
            args.extend([index, message.to_json()])
        await self._publish(
            keys=[*stream_keys, *dedup_keys],
            args=[self._now_ms(), self.dedup_window_s, len(stream_keys), *args],
        )

    # ---- consuming -----------------------------------------------------------------------------

    async def read(
        self, topic: str, group: str, consumer: str, *, max_messages: int, block_s: float
    ) -> list[Delivery]:
        # Polling, not XREADGROUP BLOCK: the read must stay one atomic script to keep order.
        return await poll_read(
            lambda: self._read_once(topic, group, consumer, max_messages),
            max_messages=max_messages,
            block_s=block_s,
            poll_interval_s=self.poll_interval_s,
        )

    async def _read_once(self, topic: str, group: str, consumer: str, max_messages: int) -> list[Delivery]:
        keys, args = self._read_call(topic, group, consumer, max_messages)
        return self._deliveries(topic, group, consumer, await self._read(keys=keys, args=args))

    def _read_call(
        self, topic: str, group: str, consumer: str, max_messages: int
    ) -> tuple[list[str], list[Any]]:
        start = self._next_start % self.partitions
        self._next_start += 1
        keys = [*self._keys(topic), self._replay_queue(topic, group)]
        args = [
            group,
            consumer,
            max_messages,
            int(self.visibility_timeout_s * 1000),
            self.max_attempts,
            int(self.retry_delay_s * 1000),
            start,
            topic,
            self._dlq,
            self._now_iso(),
            *(str(new_id()) for _ in range(self.partitions)),
        ]
        return keys, args

    def _deliveries(self, topic: str, group: str, consumer: str, answer: Any) -> list[Delivery]:
        dead, rows = answer
        for _ in range(int(dead)):
            self._hook.dead_lettered(group=group, topic=topic)
        return [
            Delivery(
                message=Message.from_json(envelope),
                topic=topic,
                group=group,
                consumer=consumer,
                partition=int(partition),
                offset=int(offset),
                attempt=int(attempt),
                receipt=f"{_DLQ_RECEIPT}{_text(ref)}" if _text(kind) == "dlq" else _text(ref),
            )
            for kind, partition, offset, attempt, envelope, ref in rows
        ]

    async def ack(self, delivery: Delivery) -> None:
        if delivery.receipt.startswith(_DLQ_RECEIPT):
            await self._settle_replay(delivery, error=None)
            return
        await self._ack(
            keys=[self._key(delivery.topic, delivery.partition)],
            args=[delivery.group, delivery.consumer, delivery.receipt, delivery.attempt],
        )

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Every live delivery of `deliveries` acknowledged in one script call (each checked as
        `ack` checks it: still pending, same consumer, same attempt); dead letters being replayed
        are settled one by one. Per group, in the order given."""
        replays, calls = self._ack_calls(deliveries)
        for delivery in replays:
            await self._settle_replay(delivery, error=None)
        for keys, args in calls:
            await self._ack_many(keys=keys, args=args)

    async def append_ack_read(
        self,
        key: str,
        max_len: int,
        payloads: Sequence[bytes],
        deliveries: Sequence[Delivery],
        *,
        read_next: ReadNext | None = None,
    ) -> list[Delivery] | None:
        """XADD each of `payloads` (as field `e`) to the stream `key` (capped at about `max_len`:
        another producer's stream on this Redis database, such as the real-time broker's), then
        `ack_many(deliveries)`, then with `read_next` the read `read(topic, group, consumer,
        max_messages=n, block_s=0)` would make: one script, one round trip (ADR 0086). A script runs
        whole or stops at its first failing command, and the appends come first: a refused append
        (out of memory, a wrong type at `key`) acknowledges nothing. `deliveries` are of one group;
        dead letters being replayed among them are settled after, one by one, as `ack_many` does.
        Returns the read's deliveries (None: not asked)."""
        replays, calls = self._ack_calls(deliveries)
        if len(calls) > 1:
            raise ValueError("append_ack_read acknowledges the deliveries of one group")
        ack_keys, ack_args = calls[0] if calls else ([], [])
        read_keys: list[str] = []
        read_args: list[Any] = []
        if read_next is not None:
            read_keys, read_args = self._read_call(*read_next)
        answer = await self._append_ack_read(
            keys=[key, *ack_keys, *read_keys],
            args=[len(payloads), max_len, *payloads, len(ack_keys), len(ack_args), *ack_args, *read_args],
        )
        for delivery in replays:
            await self._settle_replay(delivery, error=None)
        if read_next is None:
            return None
        return self._deliveries(read_next[0], read_next[1], read_next[2], answer[1])

    def _ack_calls(
        self, deliveries: Sequence[Delivery]
    ) -> tuple[list[Delivery], list[tuple[list[str], list[Any]]]]:
        """(dead letters being replayed, one `ACK_MANY` call's keys and args per group)."""
        replays: list[Delivery] = []
        keys: dict[tuple[str, str], dict[str, int]] = {}
        args: dict[tuple[str, str], list[Any]] = {}
        for delivery in deliveries:
            if delivery.receipt.startswith(_DLQ_RECEIPT):
                replays.append(delivery)
                continue
            slot = (delivery.topic, delivery.group)
            group_keys = keys.setdefault(slot, {})
            key = self._key(delivery.topic, delivery.partition)
            index = group_keys.setdefault(key, len(group_keys) + 1)
            args.setdefault(slot, []).extend([index, delivery.consumer, delivery.receipt, delivery.attempt])
        return replays, [(list(keys[slot]), [slot[1], *rest]) for slot, rest in args.items()]

    async def nack(self, delivery: Delivery, *, error: str) -> None:
        if delivery.receipt.startswith(_DLQ_RECEIPT):
            await self._settle_replay(delivery, error=error)
            return
        dead = await self._nack(
            keys=[self._key(delivery.topic, delivery.partition)],
            args=[
                delivery.group,
                delivery.consumer,
                delivery.receipt,
                delivery.attempt,
                self.max_attempts,
                error[:4000],
                delivery.topic,
                delivery.partition,
                self._dlq,
                str(new_id()),
                self._now_iso(),
            ],
        )
        if int(dead) == 1:
            self._hook.dead_lettered(group=delivery.group, topic=delivery.topic)

    # ---- dead letters --------------------------------------------------------------------------

    async def _settle_replay(self, delivery: Delivery, *, error: str | None) -> None:
        letter_id = delivery.receipt.removeprefix(_DLQ_RECEIPT)
        changed = await self._settle(
            keys=[f"{self._dlq}:{letter_id}", self._replay_queue(delivery.topic, delivery.group)],
            args=[letter_id, "ack" if error is None else "nack", self._now_iso(), (error or "")[:4000]],
        )
        if error is not None and int(changed):
            self._hook.dead_lettered(group=delivery.group, topic=delivery.topic)

    async def dead_letters(
        self, *, topic: str | None = None, group: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        # Ids are UUIDv7 strings in a sorted set with equal scores: lexical order is dead order.
        ids = [_text(i) for i in await self._redis.zrange(self._dlq, 0, -1)]
        out: list[DeadLetter] = []
        async with self._redis.pipeline(transaction=False) as pipe:
            for letter_id in ids:
                pipe.hgetall(f"{self._dlq}:{letter_id}")
            rows = await pipe.execute()
        for row in rows:
            if not row:
                continue
            letter = _dead_letter(row)
            if (topic is None or letter.topic == topic) and (group is None or letter.group == group):
                out.append(letter)
                if len(out) >= limit:
                    break
        return out

    async def dead_letter(self, dead_letter_id: uuid.UUID) -> DeadLetter | None:
        row = await self._redis.hgetall(f"{self._dlq}:{dead_letter_id}")  # type: ignore[misc]
        return _dead_letter(row) if row else None

    async def replay_dead_letters(
        self, *, ids: Sequence[uuid.UUID] | None = None, topic: str | None = None
    ) -> int:
        if ids is None:
            names = [_text(i) for i in await self._redis.zrange(self._dlq, 0, -1)]
        else:
            names = [str(i) for i in ids]
        if not names:
            return 0
        queued = await self._replay_letters(
            keys=[f"{self._dlq}:{name}" for name in names],
            args=["1" if ids is not None else "0", topic or "", self._dlq],
        )
        return int(queued)

    # ---- replay and lag ------------------------------------------------------------------------

    async def replay(
        self,
        topic: str,
        group: str,
        *,
        from_offset: int | None = None,
        from_time: datetime | None = None,
        partition: int | None = None,
    ) -> None:
        check_replay_start(from_offset, from_time)
        if from_offset is not None:
            mode, value = "offset", from_offset
        else:
            assert from_time is not None
            mode, value = "time", int(from_time.timestamp() * 1000)
        targets = range(self.partitions) if partition is None else [partition]
        for p in targets:
            await self._replay(keys=[self._key(topic, p)], args=[group, mode, value])

    async def lag(self, topic: str, group: str) -> int:
        return int(await self._lag(keys=self._keys(topic), args=[group]))

    # ---- housekeeping --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the Redis client (the composition root hands this stream a client of its own)."""
        await self._redis.aclose()

    async def delete_all(self) -> None:
        """Remove every key under this stream's prefix (tests and benchmarks clean up with it)."""
        batch: list[Any] = []
        async for key in self._redis.scan_iter(match=f"{self.prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await self._redis.delete(*batch)
                batch.clear()
        if batch:
            await self._redis.delete(*batch)


def _dead_letter(row: dict[Any, Any]) -> DeadLetter:
    h = {_text(k): _text(v) for k, v in row.items()}
    return DeadLetter(
        id=uuid.UUID(h["id"]),
        group=h["group"],
        topic=h["topic"],
        partition=int(h["partition"]),
        offset=int(h["offset"]),
        message=Message.from_json(h["envelope"]),
        attempts=int(h["attempts"]),
        last_error=h["last_error"] or None,
        dead_at=datetime.fromisoformat(h["dead_at"]),
        status=DeadLetterStatus(h["status"]),
        replayed_at=datetime.fromisoformat(h["replayed_at"]) if h["replayed_at"] else None,
    )
