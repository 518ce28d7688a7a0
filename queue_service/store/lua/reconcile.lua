-- Recount a service's counters from the streams (periodic maintenance): the scripts keep them true in the
-- same step as the streams, this repairs what a hand edit of the keys broke. Bytes are recounted only
-- for a sink of at most `max_scan` results.
-- KEYS: in_high, in_normal, counts, sink_high, sink_normal
-- ARGV: max_scan
-- Returns {waiting, waiting_high, sink_used, sink_bytes} as they are now.
local max_scan = tonumber(ARGV[1])
local waiting, waiting_high, held_async = 0, 0, 0
for i = 1, 2 do
  local left = redis.call('XLEN', KEYS[i])
  local p = redis.pcall('XPENDING', KEYS[i], WORKER_GROUP, '-', '+', max_scan)
  if not p['err'] then
    for _, pending in ipairs(p) do
      local f = entry(KEYS[i], pending[1])
      if f then
        left = left - 1
        if not f['reply'] then held_async = held_async + 1 end
      end
    end
  end
  waiting = waiting + left
  if i == 1 then waiting_high = left end
end
local results = redis.call('XLEN', KEYS[4]) + redis.call('XLEN', KEYS[5])
redis.call('HSET', KEYS[3], 'waiting', waiting, 'waiting_high', waiting_high, 'sink_used', results + held_async)
if results <= max_scan then
  local bytes = 0
  for i = 4, 5 do
    for _, e in ipairs(redis.call('XRANGE', KEYS[i], '-', '+')) do bytes = bytes + #(fields_of(e[2])['data'] or '') end
  end
  redis.call('HSET', KEYS[3], 'sink_bytes', bytes)
end
return redis.call('HMGET', KEYS[3], 'waiting', 'waiting_high', 'sink_used', 'sink_bytes')
