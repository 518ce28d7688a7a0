-- Negative commit: a consumer of a client group refuses items its group was delivered (say, code `Shutdown`: it is
-- about to exit). Each goes back to the group, claimable at once: the next consumer of the group that looks for
-- work takes it, and its delivery count goes up by one. An item the group was delivered `max_delivery` times
-- ends instead: an input item is removed and its request gets a terminal result in the sink that carries the
-- refusal (tags requestId and lastCode, the message `<code>: <reason>`), so a client asking for it hears how
-- it ended, and its `completed` webhooks are enqueued in the same step; a sink item (a result), or a sync
-- request (its API process answers it), is only given up by the group: acknowledged for it, and left in the
-- queue. Indexes the group does not hold are skipped.
-- KEYS: high, normal, ids, counts, sink_normal, sink_seq, sink_ids, webhooks, webhooks_requests
-- ARGV: kind (input|sink), group, max_delivery (0: none), release_idle_ms, now_ms, last_code, message, indexes...
-- Returns {released, ended}.
local kind, group, max_delivery = ARGV[1], ARGV[2], tonumber(ARGV[3])
local release_idle, now_ms, last_code, message = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local released, ended = 0, 0

-- {consumer, deliveries} of the group's hold on entry `id`, or nil.
local function hold_of(stream, id)
  local p = redis.pcall('XPENDING', stream, group, id, id, 1)
  if p['err'] or #p == 0 then return nil end
  return {p[1][2], tonumber(p[1][4])}
end

local function finish_refused(i, id, f)
  local worker_held = owner_of(KEYS[i], WORKER_GROUP, id) ~= nil
  -- A worker's hold had taken room in the sink for its result: that room is the terminal result's now.
  remove_item({stream = KEYS[i], ids = KEYS[3], counts = KEYS[4], kind = 'input', high = i == 1}, id, f, group,
    now_ms, true)
  if not worker_held then redis.call('HINCRBY', KEYS[4], 'sink_used', 1) end
  local tags = cjson.decode(f['tags'] or '{}')
  tags['requestId'] = f['rid']
  tags['lastCode'] = last_code
  local out, stored = append_item(KEYS[5], KEYS[6], KEYS[7], f['rid'],
    {'data', message, 'tags', cjson.encode(tags), 'rid', f['rid'], 'ts', now_ms, 'message', message, 'code', last_code,
     'acc', f['ts'] or '0'})
  if stored then
    redis.call('HINCRBY', KEYS[4], 'sink_bytes', #message)
    enqueue_hooks({stream = KEYS[8], requests = KEYS[9]}, f['hooks'], 'completed', f['rid'], now_ms,
      {'index', string.match(id, '^(%d+)'), 'sink', tostring(out), 'code', last_code, 'message', message,
       'tags', f['tags'] or '{}', 'put', f['ts'] or '0', 'size', tostring(#message), 'rtype', 'text/plain; charset=utf-8'})
  else
    redis.call('HINCRBY', KEYS[4], 'sink_used', -1) -- the sink has this request's result already
  end
end

for j = 8, #ARGV do
  local id = sid(ARGV[j])
  for i = 1, 2 do
    local f = entry(KEYS[i], id)
    if f then
      local hold = hold_of(KEYS[i], id)
      if hold then
        if max_delivery > 0 and hold[2] >= max_delivery then
          if kind == 'input' and f['rid'] and not f['reply'] then
            finish_refused(i, id, f)
          else
            redis.call('XACK', KEYS[i], group, id)
          end
          ended = ended + 1
        else
          redis.call('XCLAIM', KEYS[i], group, hold[1], 0, id, 'IDLE', release_idle, 'JUSTID')
          released = released + 1
        end
      end
      break
    end
  end
end
return {released, ended}
