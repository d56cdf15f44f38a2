-- Token bucket: capacity C, refill r = rate / period per second (see TokenBucket in algorithms.py).
local cap = capacity
local per_s = rate / period
local state = redis.call('HMGET', key, 'tokens', 'ts')
local tokens = cap
local updated = now
if state[1] then
  tokens = tonumber(state[1])
  updated = tonumber(state[2])
end
local elapsed = math.max(0, now - updated)
tokens = math.min(cap, tokens + elapsed * per_s)
local allowed = tokens + EPSILON >= cost
if allowed and commit then
  tokens = math.max(0, tokens - cost)
  redis.call('HSET', key, 'tokens', num(tokens), 'ts', num(now))
  redis.call('PEXPIRE', key, ttl_ms((cap - tokens) / per_s))
end
local reset_after = (cap - tokens) / per_s
local retry_after = 0
if not allowed then
  retry_after = (cost - tokens) / per_s
end
return reply(allowed, math.floor(tokens + EPSILON), reset_after, retry_after)
