-- Prepended to every limiter script. ARGV: rate, period_s, capacity, cost, commit ('1'/'0'),
-- now override ('' = Redis server time). The maths mirror algorithms.py line for
-- line, so a script and its Python core give the same floats for the same inputs.
local EPSILON = 1e-9
local key = KEYS[1]
local rate = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local capacity = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local commit = ARGV[5] == '1'
local now
if ARGV[6] ~= '' then
  now = tonumber(ARGV[6])
else
  -- The server's clock, so every API process decides on one shared time, whatever its own clock says.
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Floats travel as strings: Redis truncates Lua numbers to integers in replies, and %.17g round-trips.
local function num(x)
  return string.format('%.17g', x)
end

-- TTL in whole milliseconds, rounded up (+1) so a key never vanishes while its state still matters.
local function ttl_ms(ttl_s)
  return math.max(1, math.ceil(ttl_s * 1000) + 1)
end

local function reply(allowed, remaining, reset_after, retry_after)
  return {allowed and 1 or 0, remaining, num(reset_after), num(retry_after)}
end
