-- Fixed window: w = floor(now / period), admit when count(w) + cost <= rate (see FixedWindow).
local window = math.floor(now / period)
local state = redis.call('HMGET', key, 'w', 'c')
local count = 0
if state[1] and tonumber(state[1]) == window then
  count = tonumber(state[2])
end
local allowed = count + cost <= rate
local reset_after = math.max(0, (window + 1) * period - now)
if allowed and commit then
  count = count + cost
  redis.call('HSET', key, 'w', num(window), 'c', count)
  redis.call('PEXPIRE', key, ttl_ms(reset_after))
end
local retry_after = 0
if not allowed then
  retry_after = reset_after
end
return reply(allowed, rate - count, reset_after, retry_after)
