-- Leaky bucket (GCRA): T = period / rate, tau = capacity * T, state = TAT (see LeakyBucket in algorithms.py).
-- ARGV[7] == '' meters (hit/peek); otherwise it is max_wait_s and the call shapes (acquire).
local interval = period / rate
local tau = capacity * interval
local stored = redis.call('GET', key)
local tat = now
if stored then
  tat = math.max(tonumber(stored), now)
end
local new_tat = tat + cost * interval
if ARGV[7] == '' then
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
end
local max_wait = tonumber(ARGV[7])
local wait = tat - now
local granted = new_tat - now <= tau + EPSILON and wait <= max_wait + EPSILON
if granted then
  tat = new_tat
  redis.call('SET', key, num(tat), 'PX', ttl_ms(tat - now))
end
local queued = math.max(0, math.ceil((tat - now) / interval - EPSILON))
local retry_after = 0
if not granted then
  retry_after = math.max(0, math.max(new_tat - tau, tat - max_wait) - now)
  wait = 0
end
return {granted and 1 or 0, queued, num(wait), num(retry_after)}
