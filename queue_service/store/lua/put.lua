-- Put one item: the bound check and the write in one atomic step, so concurrent putters never overshoot.
-- Input: at most `max_items` waiting (put, not taken by a worker); a sync request (reply channel set) is
-- refused at once when no worker is live (looked at only when `now_s` is given: the API looks once a
-- second). Sink: at most `max_items` results and `max_bytes` of data.
-- An Idempotency-Key seen within its lifetime answers the first put's index and request id, storing nothing.
-- A request with a TTL carries its deadline (`exp`, Redis's clock) and is listed in the deadlines set.
-- A queue whose stream has ended (eos.lua) takes no more puts.
-- KEYS: stream (the priority or normal stream), seq, ids, counts, workers (live workers; any key unless sync),
--       deadlines, idempotency (the key's; any key of the service when there is none), end (the queue's
--       end-of-stream marker), bell (the workers' bell, rung for an input item; any key for the sink)
-- ARGV: kind (input|sink), data, tags_json, rid, ts_ms, priority (1|0), max_items (0: none),
--       max_bytes (0: none), reply_channel (''), now_s ('': no look at the live workers), path (''),
--       content_type (''), ttl_ms (0: none), hooks ('' or the webhook targets' JSON), idempotent (1|0),
--       idempotency_ttl_s
-- Returns the index, or {'full', 'items'|'bytes'}, or {'no-worker'}, or {'same', '<index>:<rid>'}, or
-- {'ended', last index before the end}.
local kind, data, rid, priority = ARGV[1], ARGV[2], ARGV[4], ARGV[6] == '1'
local ttl, hooks, idempotent = tonumber(ARGV[13]) or 0, ARGV[14] or '', ARGV[15] == '1'
if idempotent then
  local first = redis.call('GET', KEYS[7])
  if first then return {'same', first} end
end
local max_items, max_bytes, reply = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
local ended = redis.call('GET', KEYS[8])
if ended then return {'ended', ended} end
if reply ~= '' and ARGV[10] ~= '' and redis.call('ZCOUNT', KEYS[5], ARGV[10], '+inf') == 0 then
  return {'no-worker'}
end
local counted = 'waiting'
if kind == 'sink' then counted = 'sink_used' end
local used = redis.call('HINCRBY', KEYS[4], counted, 1)
if max_items > 0 and used > max_items then
  redis.call('HINCRBY', KEYS[4], counted, -1)
  return {'full', 'items'}
end
if kind == 'sink' and max_bytes > 0 and num(redis.call('HGET', KEYS[4], 'sink_bytes')) + #data > max_bytes then
  redis.call('HINCRBY', KEYS[4], counted, -1)
  return {'full', 'bytes'}
end
local fields = {'data', data, 'tags', ARGV[3], 'rid', rid, 'ts', ARGV[5]}
if reply ~= '' then
  fields[#fields + 1] = 'reply'
  fields[#fields + 1] = reply
end
if ARGV[11] ~= '' then
  fields[#fields + 1] = 'path'
  fields[#fields + 1] = ARGV[11]
end
if ARGV[12] ~= '' then
  fields[#fields + 1] = 'type'
  fields[#fields + 1] = ARGV[12]
end
local deadline = 0
if ttl > 0 then
  deadline = redis_now_ms() + ttl
  fields[#fields + 1] = 'exp'
  fields[#fields + 1] = ms(deadline)
end
if hooks ~= '' then
  fields[#fields + 1] = 'hooks'
  fields[#fields + 1] = hooks
end
local index, stored = append_item(KEYS[1], KEYS[2], KEYS[3], rid, fields)
if not stored then
  redis.call('HINCRBY', KEYS[4], counted, -1)
  return index
end
if kind == 'sink' then
  redis.call('HINCRBY', KEYS[4], 'sink_bytes', #data)
else
  if priority then redis.call('HINCRBY', KEYS[4], 'waiting_high', 1) end
  -- Wakes one idle worker (keys.bell): trimmed to one entry, each read by one worker of the group.
  redis.call('XADD', KEYS[9], 'MAXLEN', '1', '*', 'r', '1')
end
if deadline > 0 then redis.call('ZADD', KEYS[6], deadline, ms(index)) end
if idempotent then redis.call('SET', KEYS[7], ms(index) .. ':' .. rid, 'EX', ARGV[16]) end
return index
