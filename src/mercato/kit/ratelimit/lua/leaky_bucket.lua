-- Leaky bucket (GCRA): T = period / rate, tau = capacity * T, state = TAT (see LeakyBucket in algorithms.py).
local interval = period / rate
local tau = capacity * interval
local stored = redis.call('GET', key)
local tat = now
if stored then
  tat = math.max(tonumber(stored), now)
end
local new_tat = tat + cost * interval
local allowed = new_tat - now <= tau + EPSILON
if allowed and commit then
  tat = new_tat
  redis.call('SET', key, num(tat), 'PX', ttl_ms(tat - now))
end
local remaining = math.max(0, math.floor((tau - (tat - now)) / interval + EPSILON))
local retry_after = 0
if not allowed then
  retry_after = new_tat - tau - now
end
return reply(allowed, remaining, tat - now, retry_after)
