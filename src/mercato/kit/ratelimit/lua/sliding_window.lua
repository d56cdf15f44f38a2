-- Sliding window counter: estimate = previous * (1 - e / period) + current (see SlidingWindowCounter).
local window = math.floor(now / period)
local state = redis.call('HMGET', key, 'w', 'p', 'c')
local previous = 0
local current = 0
if state[1] then
  local stored = tonumber(state[1])
  if stored == window then
    previous = tonumber(state[2])
    current = tonumber(state[3])
  elseif stored == window - 1 then
    previous = tonumber(state[3])
  end
end
local elapsed = math.min(period, math.max(0, now - window * period))
local weight = 1 - elapsed / period
local allowed = previous * weight + current + cost <= rate + EPSILON
if allowed and commit then
  current = current + cost
  redis.call('HSET', key, 'w', num(window), 'p', previous, 'c', current)
  redis.call('PEXPIRE', key, ttl_ms(2 * period - elapsed))
end
local remaining = math.max(0, math.floor(rate - (previous * weight + current) + EPSILON))
local reset_after = 0
if current > 0 then
  reset_after = 2 * period - elapsed
elseif previous > 0 then
  reset_after = period - elapsed
end
local retry_after = 0
if not allowed then
  local need = rate - cost
  local at = period
  if previous > 0 and current <= need then
    at = period * (1 - (need - current) / previous)
  end
  if at < period then
    retry_after = math.max(0, at - elapsed)
  else
    local later = 0
    if current > 0 then
      later = math.max(0, period * (1 - need / current))
    end
    retry_after = (period - elapsed) + later
  end
end
return reply(allowed, remaining, reset_after, retry_after)
