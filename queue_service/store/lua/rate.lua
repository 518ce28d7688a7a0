-- Rate limit, GCRA: at most `rate` requests per second per service with bursts of up to one
-- second's worth, counted in Redis so every API process shares one limit. Uses Redis's clock,
-- not the callers', so API hosts with skewed clocks still agree.
-- KEYS: rate_key
-- ARGV: rate (requests per second)
-- Returns 0 when admitted, else milliseconds until a request would be admitted.
local rate = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = 1000 / rate
local burst = math.max(rate, 1) * interval
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local next_tat = tat + interval
local allowed_at = next_tat - burst
if allowed_at > now then return math.ceil(allowed_at - now) end
redis.call('SET', KEYS[1], tostring(next_tat), 'PX', math.ceil(next_tat - now) + 1000)
return 0
