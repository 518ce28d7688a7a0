-- Take up to `want` input items for one worker of the workers' group: first, when `lease_ms` > 0, items
-- whose lease lapsed (their holder stopped renewing: killed, hung, cut off), then new ones, priority
-- stream first. A lapsed item delivered `max_delivery` times already comes back marked exhausted: the
-- worker gives it up with a terminal answer instead of running it again.
-- Back-pressure: a full sink stops intake rather than dropping results. Each new async item takes room in
-- the sink for its result at once (`sink_used`), so new items are taken only while that room is there.
-- Deadlines: an item whose deadline (`exp`) has passed comes back marked expired and never runs; the worker
-- ends it with its terminal answer. Webhooks: each item handed over to run enqueues its `start` deliveries.
-- KEYS: high, normal, counts, seq, webhooks stream, webhooks requests
-- ARGV: consumer, want, lease_ms (0: no lapsed items), max_delivery (0: no limit), sink_max_items (0: none),
--       sink_max_bytes (0: none), restart_guard_ms ('': none)
-- Returns, packed (lib.lua), {sink_full (1|0), last index given out (0 unless nothing was taken), {{stream,
--          id, fields, deliveries, ending (0: run it, 1: exhausted, 2: expired)}...}}.
local consumer, want = ARGV[1], tonumber(ARGV[2])
local lease, max_delivery = tonumber(ARGV[3]), tonumber(ARGV[4])
local sink_max, sink_max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local taken = {}
local now = nil

-- 2 (expired) when the item's deadline has passed, else `otherwise`.
local function ending(f, otherwise)
  if not f['exp'] then return otherwise end
  now = now or redis_now_ms()
  if tonumber(f['exp']) <= now then return 2 end
  return otherwise
end

if lease > 0 then
  lease = claim_lease(lease, ARGV[7])
  for i = 1, 2 do
    local s = KEYS[i]
    while #taken < want do
      local p = redis.pcall('XPENDING', s, WORKER_GROUP, 'IDLE', lease, '-', '+', 1)
      if p['err'] or #p == 0 then break end
      local id, deliveries = p[1][1], tonumber(p[1][4])
      local c = redis.call('XCLAIM', s, WORKER_GROUP, consumer, lease, id)
      if #c > 0 and c[1] then
        local exhausted = 0
        if max_delivery > 0 and deliveries >= max_delivery then exhausted = 1 end
        taken[#taken + 1] = {s, c[1][1], c[1][2], deliveries + 1, ending(fields_of(c[1][2]), exhausted)}
      else
        redis.call('XACK', s, WORKER_GROUP, id) -- the entry itself is gone
      end
    end
  end
end

local counts = redis.call('HMGET', KEYS[3], 'waiting', 'waiting_high', 'sink_used', 'sink_bytes')
local waiting, waiting_high = num(counts[1]), num(counts[2])
local room = want - #taken
if sink_max > 0 then room = math.min(room, sink_max - num(counts[3])) end
if sink_max_bytes > 0 and num(counts[4]) >= sink_max_bytes then room = 0 end
local sink_full = 0
if room <= 0 and #taken < want and waiting > 0 then sink_full = 1 end

local function read_new(s, count)
  local r = redis.pcall('XREADGROUP', 'GROUP', WORKER_GROUP, consumer, 'COUNT', count, 'STREAMS', s, '>')
  if type(r) == 'table' and r['err'] then
    redis.call('XGROUP', 'CREATE', s, WORKER_GROUP, '0', 'MKSTREAM')
    r = redis.call('XREADGROUP', 'GROUP', WORKER_GROUP, consumer, 'COUNT', count, 'STREAMS', s, '>')
  end
  if not r then return {} end
  return r[1][2]
end

local fresh, fresh_high, fresh_async = 0, 0, 0
local read = {}  -- the fields of the items read new, by their place in `taken`
for i = 1, 2 do
  local pool = waiting - waiting_high
  if i == 1 then pool = waiting_high end
  local count = math.min(room - fresh, pool)
  if count > 0 then
    for _, e in ipairs(read_new(KEYS[i], count)) do
      local f = fields_of(e[2])
      taken[#taken + 1] = {KEYS[i], e[1], e[2], 1, ending(f, 0)}
      read[#taken] = f
      fresh = fresh + 1
      if i == 1 then fresh_high = fresh_high + 1 end
      if not f['reply'] then fresh_async = fresh_async + 1 end
    end
  end
end
if fresh > 0 then redis.call('HINCRBY', KEYS[3], 'waiting', -fresh) end
if fresh_high > 0 then redis.call('HINCRBY', KEYS[3], 'waiting_high', -fresh_high) end
if fresh_async > 0 then redis.call('HINCRBY', KEYS[3], 'sink_used', fresh_async) end

local H = {stream = KEYS[5], requests = KEYS[6]}
for n, t in ipairs(taken) do
  if t[5] == 0 then
    local f = read[n] or fields_of(t[3])
    if f['hooks'] then
      now = now or redis_now_ms()
      enqueue_hooks(H, f['hooks'], 'start', f['rid'] or '', ms(now),
        {'index', string.match(t[2], '^(%d+)'), 'put', f['ts'] or '0', 'deliveries', tostring(t[4])})
    end
  end
end

local last = 0
if #taken == 0 then last = num(redis.call('GET', KEYS[4])) end
return packed({sink_full, last, taken})
