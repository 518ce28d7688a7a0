-- End the requests whose deadline has passed while they waited, in one step each: a terminal result in the
-- sink (lastCode 408, `end` expired), the input item removed, and its `completed` webhooks enqueued. The sweep
-- for services no worker takes from; a worker's take ends the ones it meets itself (take.lua). A deadline
-- whose item a worker took, or that is gone, is only dropped. An expired result is written even into a full
-- sink: it is the request's only answer (the counters count it).
-- KEYS: in_high, in_normal, in_ids, counts, sink_normal, sink_seq, sink_ids, deadlines, webhooks stream,
--       webhooks requests
-- ARGV: most (deadlines looked at), message
-- Returns how many requests it ended.
local most, message = tonumber(ARGV[1]), ARGV[2]
local now = redis_now_ms()
local now_s = ms(now)
local H = {stream = KEYS[9], requests = KEYS[10]}
local ended = 0
for _, index in ipairs(redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now, 'LIMIT', 0, most)) do
  redis.call('ZREM', KEYS[8], index)
  local id = sid(index)
  for i = 1, 2 do
    local f = entry(KEYS[i], id)
    if f then
      if not owner_of(KEYS[i], WORKER_GROUP, id) and f['rid'] then
        local tags = cjson.decode(f['tags'] or '{}')
        tags['requestId'] = f['rid']
        tags['lastCode'] = '408'
        local tags_json = cjson.encode(tags)
        local out, stored = append_item(KEYS[5], KEYS[6], KEYS[7], f['rid'], {'data', message, 'tags', tags_json,
          'rid', f['rid'], 'ts', now_s, 'message', message, 'code', '408', 'acc', f['ts'] or '0', 'start', '0',
          'end', 'expired'})
        if stored then
          redis.call('HINCRBY', KEYS[4], 'sink_used', 1)
          redis.call('HINCRBY', KEYS[4], 'sink_bytes', #message)
        end
        remove_item({stream = KEYS[i], ids = KEYS[3], counts = KEYS[4], kind = 'input', high = i == 1}, id, f, nil,
          now_s)
        enqueue_hooks(H, f['hooks'], 'completed', f['rid'], now_s, {'index', index, 'sink', tostring(out),
          'code', '408', 'message', message, 'tags', tags_json, 'put', f['ts'] or '0', 'start', '0',
          'deliveries', '0', 'size', tostring(#message), 'end', 'expired', 'data', message})
        ended = ended + 1
      end
      break
    end
  end
end
return ended
