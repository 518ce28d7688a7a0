-- The state of one request, from the queues themselves: waiting or running in the input queue, its result in
-- the sink, or the time its result was removed (read with auto-delete, deleted, committed); with what its
-- worker published of it (start time), its last progress report, its deadline, and the state of its webhook
-- deliveries.
-- KEYS: in_high, in_normal, in_ids, sink_high, sink_normal, sink_ids, running, webhooks requests, progress (the
--   request's last report, chunks.lua)
-- ARGV: rid, cap (most items counted ahead)
-- Returns {'queued', index, put_ms, ahead, deadline_ms, hooks} |
--         {'running', index, put_ms, deliveries, idle_ms, deadline_ms, hooks, worker's running JSON, progress JSON} |
--         {'done', sink_index, tags_json, ts_ms, message, size, hooks, put_ms, started_ms, ending} |
--         {'removed', '<ms>:<status>[:<ending>]', hooks} | false (unknown)
-- (`hooks`: the request's deliveries JSON, '' when none; `ending`: '' or 'expired'.)
local rid, cap = ARGV[1], tonumber(ARGV[2])
local hooks = redis.call('HGET', KEYS[8], rid) or ''
local index = redis.call('HGET', KEYS[3], rid)
if index then
  local id = sid(index)
  for i = 1, 2 do
    local f = entry(KEYS[i], id)
    if f then
      local p = redis.pcall('XPENDING', KEYS[i], WORKER_GROUP, id, id, 1)
      if not p['err'] and #p > 0 then
        local published = redis.call('HGET', KEYS[7], p[1][2]) or ''
        local progress = redis.call('GET', KEYS[9]) or ''
        return {'running', index, f['ts'], p[1][4], p[1][3], f['exp'] or '0', hooks, published, progress}
      end
      return {'queued', index, f['ts'], ahead_of({KEYS[1], KEYS[2]}, i, id, WORKER_GROUP, cap), f['exp'] or '0', hooks}
    end
  end
end
local out = redis.call('HGET', KEYS[6], rid)
if out and string.sub(out, 1, 1) == '-' then return {'removed', string.sub(out, 2), hooks} end
if out then
  for i = 4, 5 do
    local e = redis.call('XRANGE', KEYS[i], sid(out), sid(out))
    if #e > 0 then
      local f = fields_of(e[1][2])
      return {'done', out, f['tags'] or '{}', f['ts'] or '0', f['message'] or '', #(f['data'] or ''), hooks,
        f['acc'] or '0', f['start'] or '0', f['end'] or ''}
    end
  end
end
return false
