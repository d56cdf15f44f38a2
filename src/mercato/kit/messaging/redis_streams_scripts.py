"""Lua scripts of `RedisStream` (kit/messaging/redis_streams.py) kept apart for that module's size."""

from __future__ import annotations

__all__ = [
    "ACK",
    "ACK_MANY",
    "LAG",
    "REPLAY_LETTERS",
    "SETTLE_REPLAY",
    "append_ack_read_script",
    "replay_script",
]

# `ack` (redis_streams.py `_ACK`) for a whole pass in one call (a consumer acknowledging a batch
# paid one round trip per message: 50 sequential calls took 40-110 ms on a loaded box and held the
# next pass back).
# KEYS: the stream keys. ARGV: group, then (key index, consumer, entry id, attempt) per delivery.
ACK_MANY = """
local group = ARGV[1]
local acked = 0
for i = 2, #ARGV, 4 do
  local key, id = KEYS[tonumber(ARGV[i])], ARGV[i + 2]
  local e = redis.call('XPENDING', key, group, id, id, 1)
  if e[1] ~= nil and e[1][2] == ARGV[i + 1] and e[1][4] == tonumber(ARGV[i + 3]) then
    acked = acked + redis.call('XACK', key, group, id)
  end
end
return acked
"""


# KEYS: partition stream keys. ARGV: group.
LAG = """
local total = 0
for _, key in ipairs(KEYS) do
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  if last then
    local info = nil
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
      local h = {}
      for i = 1, #g, 2 do h[g[i]] = g[i + 1] end
      if h['name'] == ARGV[1] then info = h end
    end
    local last_seq = tonumber(string.match(last[1], '-(%d+)$'))
    if info == nil then
      total = total + redis.call('XLEN', key)
    else
      -- Not yet delivered (offsets are dense, so a subtraction) plus delivered but not acked.
      local nxt = redis.call('XRANGE', key, '(' .. info['last-delivered-id'], '+', 'COUNT', 1)[1]
      if nxt then total = total + last_seq - tonumber(string.match(nxt[1], '-(%d+)$')) + 1 end
      total = total + info['pending']
    end
  end
end
return total
"""


# KEYS: the stream key. ARGV: group, consumer, entry id, attempt.
ACK = """
local e = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if e[1] == nil or e[1][2] ~= ARGV[2] or e[1][4] ~= tonumber(ARGV[4]) then return 0 end
return redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
"""

# KEYS: letter hash, replay queue. ARGV: letter id, outcome ('ack'|'nack'), now_iso, error.
SETTLE_REPLAY = """
if redis.call('HGET', KEYS[1], 'status') ~= 'replaying' then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] == 'ack' then
  redis.call('HSET', KEYS[1], 'status', 'replayed', 'replayed_at', ARGV[3])
else
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('HSET', KEYS[1], 'status', 'dead', 'last_error', ARGV[4], 'dead_at', ARGV[3])
end
return 1
"""

# KEYS: letter hashes. ARGV: named ('1'|'0'), topic filter ('' for any), dlq prefix.
REPLAY_LETTERS = """
local queued = 0
for i, key in ipairs(KEYS) do
  local h = redis.call('HMGET', key, 'status', 'topic', 'group', 'id')
  local ok = h[1] == 'dead' or (ARGV[1] == '1' and h[1] == 'replayed')
  if ok and (ARGV[2] == '' or ARGV[2] == h[2]) then
    redis.call('HSET', key, 'status', 'replaying')
    redis.call('ZADD', ARGV[3] .. ':replay:' .. h[2] .. ':' .. h[3], 0, h[4])
    queued = queued + 1
  end
end
return queued
"""


# KEYS: one stream key. ARGV: group, mode ('offset'|'time'), value.
_REPLAY_BODY = """
local key, group, mode, value = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
-- Creating an existing group fails harmlessly (BUSYGROUP): pcall returns the error.
redis.pcall('XGROUP', 'CREATE', key, group, '0', 'MKSTREAM')
-- A rewound group starts afresh: forget what it had out (and those entries' attempt counts).
while true do
  local pend = redis.call('XPENDING', key, group, '-', '+', 1000)
  if #pend == 0 then break end
  local ids = {}
  for i, e in ipairs(pend) do ids[i] = e[1] end
  redis.call('XACK', key, group, unpack(ids))
end
local target = '0'
if mode == 'time' then
  if value > 0 then target = string.format('%.0f-18446744073709551615', value - 1) end
elseif value > 0 then
  local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1]
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  if last and seq_of(last[1]) < value then
    target = '$'
  elseif first and seq_of(first[1]) < value then
    -- Binary search on the time part for the smallest ms whose last entry has offset >= value;
    -- offsets and times both increase, so the entry at `value` carries that ms.
    local lo = tonumber(string.match(first[1], '^(%d+)-'))
    local hi = tonumber(string.match(last[1], '^(%d+)-'))
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      local e = redis.call('XREVRANGE', key, string.format('%.0f-18446744073709551615', mid), '-', 'COUNT', 1)
      if e[1] and seq_of(e[1][1]) >= value then hi = mid else lo = mid + 1 end
    end
    target = string.format('%.0f-%.0f', lo, value - 1)
  end
end
redis.call('XGROUP', 'SETID', key, group, target)
return 1
"""


def replay_script(common: str) -> str:
    """`replay`'s script: redis_streams.py's common functions, then its body."""
    return common + _REPLAY_BODY


def append_ack_read_script(common: str, read: str) -> str:
    """`RedisStream.append_ack_read`'s script (ADR 0086): appends to another stream (the real-time
    broker's), then `ACK_MANY`, then with read keys the stream's READ (`common` + its body), in one
    script. ACK_MANY's and READ's own bodies run unchanged, as functions of their KEYS and ARGV slices.

    KEYS: the appended stream, the ack's stream keys, then the read's keys (none: no read).
    ARGV: n, max_len, n payloads (field `e`), #ack keys, #ack args, ACK_MANY's args, READ's args."""
    if not read.startswith(common):
        raise ValueError("the read script starts with the common functions")
    return (
        common
        + "local function ack_many(KEYS, ARGV)\n"
        + ACK_MANY
        + "\nend\nlocal function read(KEYS, ARGV)\n"
        + read[len(common) :]
        + """
end
local n, max_len = tonumber(ARGV[1]), ARGV[2]
for i = 1, n do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', max_len, '*', 'e', ARGV[2 + i])
end
local at = 3 + n
local nk, na = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
local acked = 0
if na > 0 then
  acked = ack_many({unpack(KEYS, 2, 1 + nk)}, {unpack(ARGV, at + 2, at + 1 + na)})
end
if #KEYS == 1 + nk then
  return {acked, false}
end
return {acked, read({unpack(KEYS, 2 + nk)}, {unpack(ARGV, at + 2 + na)})}
"""
    )
