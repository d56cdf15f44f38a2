-- Sliding log: a sorted set of admitted units scored by time; forget score <= now - period (see SlidingLog).
redis.call('ZREMRANGEBYSCORE', key, '-inf', num(now - period + EPSILON))
local count = redis.call('ZCARD', key)
local allowed = count + cost <= rate
local retry_after = 0
if not allowed then
  local blocking = redis.call('ZRANGE', key, count + cost - rate - 1, count + cost - rate - 1, 'WITHSCORES')
  retry_after = math.min(period, math.max(0, tonumber(blocking[2]) + period - now))
end
if allowed and commit then
  -- Members must be unique: the time plus the unit's position in the log (positions only grow at one time).
  for i = 1, cost do
    redis.call('ZADD', key, num(now), num(now) .. ':' .. (count + i))
  end
  count = count + cost
end
local reset_after = 0
if count > 0 then
  local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  reset_after = math.min(period, math.max(0, tonumber(newest[2]) + period - now))
  if allowed and commit then
    redis.call('PEXPIRE', key, ttl_ms(reset_after))
  end
end
return reply(allowed, rate - count, reset_after, retry_after)
