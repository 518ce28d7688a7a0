-- Take up to `want` webhook deliveries for one dispatcher: first those due (a retry whose backoff is over, or
-- an attempt whose dispatcher died: its lease lapsed), then new ones of the consumer group. Each one taken is
-- due again at the end of its lease, so a dispatcher that dies mid-attempt leaves it to another, which sends
-- it with the same webhook id (the entry's own).
-- KEYS: webhooks stream, due
-- ARGV: consumer, want, lease_ms
-- Returns {{entry id, fields, attempt, webhook id}...}, the stream's newest entry id ('0-0': empty), the next due time
-- ('' when nothing is scheduled).
local consumer, want, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = redis_now_ms()
local until_ms = ms(now + lease)
local taken = {}

for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, want)) do
  local c = redis.pcall('XCLAIM', KEYS[1], WEBHOOK_GROUP, consumer, 0, id)
  if type(c) == 'table' and not c['err'] and #c > 0 and c[1] then
    redis.call('ZADD', KEYS[2], until_ms, id)
    local p = redis.call('XPENDING', KEYS[1], WEBHOOK_GROUP, id, id, 1)
    taken[#taken + 1] = {id, c[1][2], p[1][4], webhook_id(id, fields_of(c[1][2]))}
  else
    redis.call('ZREM', KEYS[2], id) -- delivered or dropped meanwhile
    redis.pcall('XACK', KEYS[1], WEBHOOK_GROUP, id)
  end
end

if #taken < want then
  local r = redis.pcall('XREADGROUP', 'GROUP', WEBHOOK_GROUP, consumer, 'COUNT', want - #taken, 'STREAMS', KEYS[1], '>')
  if type(r) == 'table' and r['err'] then
    redis.call('XGROUP', 'CREATE', KEYS[1], WEBHOOK_GROUP, '0', 'MKSTREAM')
    r = redis.call('XREADGROUP', 'GROUP', WEBHOOK_GROUP, consumer, 'COUNT', want - #taken, 'STREAMS', KEYS[1], '>')
  end
  if r then
    for _, e in ipairs(r[1][2]) do
      redis.call('ZADD', KEYS[2], until_ms, e[1])
      taken[#taken + 1] = {e[1], e[2], 1, webhook_id(e[1], fields_of(e[2]))}
    end
  end
end

local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local next_due = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return {taken, (newest[1] or {'0-0'})[1], next_due[2] or ''}
