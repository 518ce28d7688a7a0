-- Finish an item: publish its outcome and remove it from the input queue in one atomic step, but only while
-- the caller holds it: a worker whose lease lapsed (the item went to another worker) writes nothing, so a
-- request has one result. held = 0 publishes for an item that is gone already: the terminal answer of a
-- request cancelled while it ran (its room in the sink was given back when it was removed).
-- KEYS: in_stream, in_ids, counts, sink_normal, sink_seq, sink_ids, replies (the API process's reply
--       stream; any key of the service when the answer goes to the sink)
-- ARGV: consumer, id, held (1|0), mode (sink|reply|none), rid, data, tags_json, ts_ms, message,
--       status, content_type, queue_wait, processing, reply_ttl_ms, reply_maxlen
-- KEYS[8]: in_seq; KEYS[9], KEYS[10]: the webhooks stream and requests hash.
-- ARGV (webhooks and status): hooks ('' or the item's targets), inline (1|0: the result goes into the
--       deliveries), put_ms, started_ms, deliveries, index, ending ('' or 'expired')
-- The `completed` deliveries of an async request are enqueued in this same step: a crash cannot lose them.
-- Returns {sink index written (0: none), items still waiting, last input index (0 while any waits)}, so that a
-- worker that sees none waiting waits for new ones without another take; or -1 when another consumer holds
-- the item now, -2 when it is gone (removed while held: cancelled, or finished by a worker that took it over).
local consumer, id, held, mode, rid, data = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4], ARGV[5], ARGV[6]
if held then
  local owner = owner_of(KEYS[1], WORKER_GROUP, id)
  if owner ~= consumer then
    if owner == nil and #redis.call('XRANGE', KEYS[1], id, id) == 0 then return -2 end
    return -1
  end
end
local out, stored = 0, false
if mode == 'reply' then
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[15], '*', 'rid', rid, 'status', ARGV[10], 'type', ARGV[11],
    'wait', ARGV[12], 'proc', ARGV[13], 'body', data)
  redis.call('PEXPIRE', KEYS[7], ARGV[14])
elseif mode == 'sink' then
  -- A request id the sink knows already (a finish resent after a lost answer, a late resend of the
  -- request) stores nothing: the first result stands, and only what was stored is counted.
  local fields = {'data', data, 'tags', ARGV[7], 'rid', rid, 'ts', ARGV[8], 'message', ARGV[9], 'code', ARGV[10],
    'acc', ARGV[18], 'start', ARGV[19]}
  if ARGV[22] ~= '' then
    fields[#fields + 1] = 'end'
    fields[#fields + 1] = ARGV[22]
  end
  out, stored = append_item(KEYS[4], KEYS[5], KEYS[6], rid, fields)
  if stored then
    redis.call('HINCRBY', KEYS[3], 'sink_bytes', #data)
    if not held then redis.call('HINCRBY', KEYS[3], 'sink_used', 1) end
  end
else
  -- Nothing to publish: the request id still tells a client asking later that it finished.
  redis.call('HSET', KEYS[6], rid, '-' .. ARGV[8] .. ':' .. ARGV[10])
end
if held then
  local Q = {stream = KEYS[1], ids = KEYS[2], counts = KEYS[3], kind = 'input'}
  local f = {rid = rid}
  if mode == 'reply' then f['reply'] = '1' end
  -- The room the held item took is now its stored result's; else it is given back.
  remove_item(Q, id, f, nil, ARGV[8], stored)
end
if mode ~= 'reply' and ARGV[16] ~= '' and (stored or mode == 'none') then
  local facts = {'index', ARGV[21], 'sink', tostring(out), 'code', ARGV[10], 'message', ARGV[9], 'tags', ARGV[7],
    'put', ARGV[18], 'start', ARGV[19], 'deliveries', ARGV[20], 'wait', ARGV[12], 'proc', ARGV[13],
    'size', tostring(#data), 'rtype', ARGV[11]}
  if ARGV[22] ~= '' then
    facts[#facts + 1] = 'end'
    facts[#facts + 1] = ARGV[22]
  end
  if ARGV[17] == '1' then
    facts[#facts + 1] = 'data'
    facts[#facts + 1] = data
  end
  enqueue_hooks({stream = KEYS[9], requests = KEYS[10]}, ARGV[16], 'completed', rid, ARGV[8], facts)
end
-- The last index matters only to a worker that will wait for new items: read it only when none waits.
local waiting = num(redis.call('HGET', KEYS[3], 'waiting'))
local last = 0
if waiting <= 0 then last = num(redis.call('GET', KEYS[8])) end
return {out, waiting, last}
