-- Take up to `want` items for one consumer: first items whose lease lapsed (their holder
-- stopped renewing: killed, hung, disconnected), then new ones; high-priority stream first.
-- An item already delivered max_delivery times is given up: it ends with a terminal item in
-- the sink (or the sync reply list) instead of being tried again.
-- KEYS: in_high, in_normal, in_ids, sink_high, sink_normal, sink_seq, sink_ids
-- ARGV: group, consumer, lease_ms, max_delivery(0 = no limit), sink_max_length(0 = none),
--       want, now_ms, reply_key_prefix, released_only_ms
local group, consumer = ARGV[1], ARGV[2]
local lease, max_delivery = tonumber(ARGV[3]), tonumber(ARGV[4])
local sink_max, want = tonumber(ARGV[5]), tonumber(ARGV[6])

-- A restarted Redis keeps each held item's delivery time, so idle times include the downtime and
-- every lease looks lapsed: for one lease period after Redis starts, only released items are
-- claimed, and live holders renew their leases first. (No released_only_ms, or no INFO as in
-- fakeredis: no guard.)
local released_only = tonumber(ARGV[9])
local info_ok, info = pcall(redis.call, 'INFO', 'server')
if released_only and info_ok and tonumber(string.match(info, 'uptime_in_seconds:(%d+)')) * 1000 < lease then
  lease = released_only
end

-- Back-pressure: a full sink stops intake rather than dropping results. Each item workers hold
-- will write one result, so it takes room in the sink already: new items are taken only while
-- results + held items stay below the bound (sink_room), and a lapsed item, whose result is
-- counted already, only while the sink itself has room (claim_room).
local sink_room, claim_room = want, true
if sink_max > 0 then
  local results = redis.call('XLEN', KEYS[4]) + redis.call('XLEN', KEYS[5])
  local held = 0
  for i = 1, 2 do held = held + tonumber(ensure_group(KEYS[i], group)['pending']) end
  sink_room = math.min(want, sink_max - results - held)
  claim_room = results < sink_max
  if sink_room <= 0 and not claim_room then return {'sink-full'} end
end

local function give_up(stream, id, deliveries)
  local f = entry(stream, id)
  if not f then
    redis.call('XACK', stream, group, id)
    return
  end
  local msg = 'given up after ' .. deliveries .. ' deliveries: the worker holding it stopped each time'
  if f['reply'] then
    local key = ARGV[8] .. f['rid']
    redis.call('RPUSH', key, '500\ntext/plain; charset=utf-8\n0 0\n' .. msg)
    redis.call('PEXPIRE', key, 60000)
  else
    local tags = cjson.decode(f['tags'])
    tags['requestId'] = f['rid']
    tags['lastCode'] = '500'
    local idx = redis.call('INCR', KEYS[6])
    redis.call('XADD', KEYS[5], idx .. '-0', 'data', '', 'tags', cjson.encode(tags), 'rid', f['rid'],
      'ts', ARGV[7], 'message', msg)
    redis.call('HSET', KEYS[7], f['rid'], idx)
  end
  remove_entry(stream, KEYS[3], id, f)
end

local taken = {}
for i = 1, 2 do
  local s = KEYS[i]
  ensure_group(s, group)
  while claim_room and #taken < want do
    local p = redis.call('XPENDING', s, group, 'IDLE', lease, '-', '+', 1)
    if #p == 0 then break end
    local id, deliveries = p[1][1], tonumber(p[1][4])
    if max_delivery > 0 and deliveries >= max_delivery then
      give_up(s, id, deliveries)
    else
      local c = redis.call('XCLAIM', s, group, consumer, lease, id)
      if #c > 0 and c[1] then
        taken[#taken + 1] = {s, c[1][1], c[1][2], deliveries + 1}
      else
        redis.call('XACK', s, group, id) -- the entry itself is gone
      end
    end
  end
  local fresh = math.min(want - #taken, sink_room)
  if fresh > 0 then
    local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', fresh, 'STREAMS', s, '>')
    -- Redis answers nil or {{stream, entries}}; fakeredis answers {} or {stream, entries}.
    local entries = {}
    if r and type(r[1]) == 'table' then entries = r[1][2] elseif r and r[2] then entries = r[2] end
    for _, e in ipairs(entries) do taken[#taken + 1] = {s, e[1], e[2], 1} end
    sink_room = sink_room - #entries
  end
end
if sink_max > 0 and #taken == 0 and sink_room <= 0 then return {'sink-full'} end
return taken
