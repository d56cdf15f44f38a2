"""Lua scripts of `RedisStream` (kit/messaging/redis_streams.py) kept apart for that module's size."""

from __future__ import annotations

__all__ = ["ACK_MANY", "LAG"]

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
