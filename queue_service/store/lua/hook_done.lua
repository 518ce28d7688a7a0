-- Record one attempt of a webhook delivery, only while the caller still holds it (a dispatcher whose lease
-- lapsed records nothing: the one that took it over does). `delivered` and `gone` (the receiver answered
-- 410) end it; `retry` makes it due again at `next_ms`; `dead` ends it as a dead letter, kept with its entry
-- (at most `dead_cap`; the oldest go) until retried by hand.
-- KEYS: webhooks stream, due, dead, requests, stats
-- ARGV: consumer, entry id, outcome (delivered|gone|retry|dead), next_ms, rid, key (<event>/<target>),
--       attempt, status (0: no answer), error, dead_cap
-- Returns 1, or 0 when the caller no longer holds the delivery.
local consumer, id, outcome = ARGV[1], ARGV[2], ARGV[3]
if owner_of(KEYS[1], WEBHOOK_GROUP, id) ~= consumer then return 0 end
local now = redis_now_ms()
if outcome == 'retry' then
  redis.call('ZADD', KEYS[2], ARGV[4], id)
  redis.call('HINCRBY', KEYS[5], 'failed', 1)
else
  redis.call('XACK', KEYS[1], WEBHOOK_GROUP, id)
  redis.call('ZREM', KEYS[2], id)
  if outcome == 'dead' then
    redis.call('ZADD', KEYS[3], now, id)
    redis.call('HINCRBY', KEYS[5], 'failed', 1)
    local over = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[10])
    if over > 0 then
      for _, old in ipairs(redis.call('ZRANGE', KEYS[3], 0, over - 1)) do
        redis.call('ZREM', KEYS[3], old)
        redis.call('XDEL', KEYS[1], old)
      end
    end
  else
    redis.call('XDEL', KEYS[1], id)
  end
  redis.call('HINCRBY', KEYS[5], outcome, 1)
end
local states = {delivered = 'delivered', gone = 'gone', retry = 'retrying', dead = 'dead'}
local state = cjson.decode(redis.call('HGET', KEYS[4], ARGV[5]) or '{}')
local record = {state = states[outcome], attempts = tonumber(ARGV[7]), at = now}
if ARGV[8] ~= '0' then record['lastStatus'] = tonumber(ARGV[8]) end
if ARGV[9] ~= '' then record['lastError'] = ARGV[9] end
if outcome == 'retry' then record['nextAt'] = tonumber(ARGV[4]) end
state[ARGV[6]] = record
redis.call('HSET', KEYS[4], ARGV[5], cjson.encode(state))
return 1
