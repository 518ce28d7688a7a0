-- Finish an item: write its result and remove it from the input queue in one atomic step,
-- but only while the caller still holds it. A worker whose lease lapsed (the item went to
-- another worker) or whose item was cancelled writes nothing: one result per request.
-- KEYS: in_stream, in_ids, sink_normal, sink_seq, sink_ids, reply_key, timings
-- ARGV: group, consumer, id, mode(sink|reply|none), data, tags_json, request_id, ts_ms,
--       reply_ttl_ms, message, then (histogram field, amount) pairs for the timings hash
-- An empty group skips the check: the terminal item of a cancelled request, whose input is gone.
if ARGV[1] ~= '' and owner_of(KEYS[1], ARGV[1], ARGV[3]) ~= ARGV[2] then return -1 end
local out = 0
if ARGV[4] == 'reply' then
  redis.call('RPUSH', KEYS[6], ARGV[5])
  redis.call('PEXPIRE', KEYS[6], ARGV[9])
elseif ARGV[4] == 'sink' then
  out = redis.call('INCR', KEYS[4])
  redis.call('XADD', KEYS[3], out .. '-0', 'data', ARGV[5], 'tags', ARGV[6], 'rid', ARGV[7],
    'ts', ARGV[8], 'message', ARGV[10])
  redis.call('HSET', KEYS[5], ARGV[7], out)
end
remove_entry(KEYS[1], KEYS[2], ARGV[3], {rid = ARGV[7]})
for i = 11, #ARGV - 1, 2 do redis.call('HINCRBYFLOAT', KEYS[7], ARGV[i], ARGV[i + 1]) end
return out
