-- Finish items: publish each outcome and remove the item from the input queue in one atomic step, but only
-- while the caller holds it: a worker whose lease lapsed (the item went to another worker) writes nothing, so
-- a request has one result. held = 0 publishes for an item that is gone already: the terminal answer of a
-- request cancelled while it ran (its room in the sink was given back when it was removed).
-- One call finishes one item or several (a chain's results) that share these keys; their removals and
-- counters go in one command each (new_removals), so a chain of n costs far less than n calls.
-- KEYS: in_stream, in_ids, counts, sink_normal, sink_seq, sink_ids, replies (the API process's reply
--       stream, which that process keeps alive; any key of the service when the answer goes to the sink),
--       webhooks stream, webhooks requests
-- ARGV: count (1|0: tell how many items wait), then for each item: consumer, id, held (1: held, 2: held
--       and taken less than half a lease ago, 0: gone already),
--       mode (sink|reply|none), rid, data, tags_json, ts_ms, message, status, content_type, queue_wait,
--       processing, reply_ttl_ms, reply_maxlen, hooks ('' or the item's targets), inline (1|0: the result
--       goes into the deliveries), put_ms, started_ms, deliveries, index, ending ('' or 'expired')
-- The `completed` deliveries of an async request are enqueued in this same step: a crash cannot lose them.
-- Returns, packed (lib.lua), {items still waiting (-1: not asked), {per item: the sink index written (0:
-- none), or -1 when another consumer holds the item now, -2 when it is gone (removed while held: cancelled, or
-- finished by a worker that took it over)}}: a worker that sees none waiting waits for a put without a take.
local PER = 22
local B = new_removals()
local answers = {}

-- The answer for an item the caller does not hold: -2 when it is gone from the stream, else -1.
local function not_held(id)
  if #redis.call('XRANGE', KEYS[1], id, id) == 0 then return -2 end
  return -1
end

local function finish_one(A)
  local consumer, id, held, mode, rid, data = A[1], A[2], A[3] ~= '0', A[4], A[5], A[6]
  local acked = false
  if A[3] == '2' then
    -- Taken less than half a lease ago: no other worker can have claimed it (a claim needs a lapsed lease or
    -- a release), so if the group still has it pending, the caller holds it: the acknowledgement is the check.
    if redis.call('XACK', KEYS[1], WORKER_GROUP, id) == 0 then return not_held(id) end
    acked = true
  elseif held then
    local owner = owner_of(KEYS[1], WORKER_GROUP, id)
    if owner ~= nil and owner ~= consumer then return -1 end
    if owner == nil then return not_held(id) end
  end
  local out, stored = 0, false
  if mode == 'reply' then
    -- The API process renews its reply stream's lifetime at each heartbeat: one command here, not two. A
    -- stream that is not there (that process is gone, or Redis lost its data) is made again, with the lifetime.
    local answer = {'rid', rid, 'status', A[10], 'type', A[11], 'wait', A[12], 'proc', A[13], 'body', data}
    if not redis.call('XADD', KEYS[7], 'NOMKSTREAM', 'MAXLEN', '~', A[15], '*', unpack(answer)) then
      redis.call('XADD', KEYS[7], 'MAXLEN', '~', A[15], '*', unpack(answer))
      redis.call('PEXPIRE', KEYS[7], A[14])
    end
  elseif mode == 'sink' then
    -- A request id the sink knows already (a finish resent after a lost answer, a late resend of the
    -- request) stores nothing: the first result stands, and only what was stored is counted.
    local fields = {'data', data, 'tags', A[7], 'rid', rid, 'ts', A[8], 'message', A[9], 'code', A[10],
      'acc', A[18], 'start', A[19]}
    if A[22] ~= '' then
      fields[#fields + 1] = 'end'
      fields[#fields + 1] = A[22]
    end
    out, stored = append_item(KEYS[4], KEYS[5], KEYS[6], rid, fields)
    if stored then
      local c = removal_counts(B, KEYS[3])
      c.bytes = c.bytes + #data
      if not held then c.used = c.used + 1 end
    end
  else
    -- Nothing to publish: the request id still tells a client asking later that it finished.
    redis.call('HSET', KEYS[6], rid, '-' .. A[8] .. ':' .. A[10])
  end
  if held then
    local Q = {stream = KEYS[1], ids = KEYS[2], counts = KEYS[3], kind = 'input', held = true, acked = acked}
    local f = {rid = rid}
    if mode == 'reply' then f['reply'] = '1' end
    -- The room the held item took is now its stored result's; else it is given back.
    remove_item(Q, id, f, nil, A[8], stored, B)
  end
  if mode ~= 'reply' and A[16] ~= '' and (stored or mode == 'none') then
    local facts = {'index', A[21], 'sink', tostring(out), 'code', A[10], 'message', A[9], 'tags', A[7],
      'put', A[18], 'start', A[19], 'deliveries', A[20], 'wait', A[12], 'proc', A[13],
      'size', tostring(#data), 'rtype', A[11]}
    if A[22] ~= '' then
      facts[#facts + 1] = 'end'
      facts[#facts + 1] = A[22]
    end
    if A[17] == '1' then
      facts[#facts + 1] = 'data'
      facts[#facts + 1] = data
    end
    enqueue_hooks({stream = KEYS[8], requests = KEYS[9]}, A[16], 'completed', rid, A[8], facts)
  end
  return out
end

for base = 1, #ARGV - 1, PER do
  answers[#answers + 1] = finish_one({unpack(ARGV, base + 1, base + PER)})
end
flush_removals(B)
if ARGV[1] ~= '1' then return packed({-1, answers}) end
return packed({num(redis.call('HGET', KEYS[3], 'waiting')), answers})
