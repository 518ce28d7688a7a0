-- Helpers prepended to every script of this folder (queue_service/store/scripts.py). Each script names its
-- KEYS and ARGV in its header; its Python wrapper, of the same name, builds them. Index arguments come as
-- decimal strings and stay strings: Lua numbers print 1e14 as "1e+14", which is no stream id.

-- A script's answer as one MessagePack string (decoded by scripts.unpacked): Redis 6.2 writes a nested
-- array reply in one write(2) per part (a take of 4 items: 10 or more, each a trip through the TCP stack),
-- a string in one. A Lua number that is whole packs as an integer.
local function packed(reply)
  return cmsgpack.pack(reply)
end

local function fields_of(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end

local function num(value)
  return tonumber(value) or 0
end

local function sid(index)
  if type(index) == 'number' then return string.format('%d-0', index) end
  return index .. '-0'
end

local function entry(stream, id)
  local e = redis.call('XRANGE', stream, id, id)
  if #e == 0 then return nil end
  return fields_of(e[1][2])
end

-- The consumer of `group` holding entry `id`, or nil (also when the group does not exist).
local function owner_of(stream, group, id)
  local p = redis.pcall('XPENDING', stream, group, id, id, 1)
  if p['err'] or #p == 0 then return nil end
  return p[1][2]
end

-- The lease a claim asks for. Right after a Redis restart, held items' idle times include the downtime and
-- every lease looks lapsed: for one lease period after Redis starts only released items are claimed, and
-- live holders renew theirs first. Asked only by the periodic claim, never on every take.
local function claim_lease(lease_ms, guard_ms)
  if guard_ms == '' then return lease_ms end
  local info = redis.call('INFO', 'server')
  local uptime = tonumber(string.match(info, 'uptime_in_seconds:(%d+)')) or 0
  if uptime * 1000 < lease_ms then return tonumber(guard_ms) end
  return lease_ms
end

-- Append one item to a queue: the next index, its entry, its request id. Returns the index, and false
-- when the request id was stored already (a resent command stores nothing twice: its first index).
local function append_item(stream, seq, ids, rid, fields)
  local index = redis.call('INCR', seq)
  if redis.call('HSETNX', ids, rid, index) == 0 then return num(redis.call('HGET', ids, rid)), false end
  redis.call('XADD', stream, sid(index), unpack(fields))
  return index, true
end

-- Removals gathered in one script, written with one command per kind and key at its end (`flush_removals`):
-- a commit of n results costs n + 5 commands, not 6n, and a chain's finishes share theirs. Gathered: sink
-- items, and input items the caller is known to hold (finish.lua); any other input item is removed at once,
-- since whether the workers' group held it decides which counter it leaves. An item named twice counts once.
local function new_removals()
  return {streams = {}, order = {}, ids = {}, gone_ids = {}, counts = {}, seen = {}}
end

local function removal_counts(B, key)
  B.counts[key] = B.counts[key] or {used = 0, bytes = 0}
  return B.counts[key]
end

-- `values` of one command, at most `step` at a time (unpack has a bound on how many values it spreads).
local function in_steps(command, key, values, step, before)
  local total = 0
  for from = 1, #values, step do
    local args = {command, key}
    if before then args[#args + 1] = before end
    for i = from, math.min(from + step - 1, #values) do args[#args + 1] = values[i] end
    total = total + redis.call(unpack(args))
  end
  return total
end

local function flush_removals(B)
  local removed = 0
  for _, stream in ipairs(B.order) do
    local s = B.streams[stream]
    if s.group then in_steps('XACK', stream, s.acks, 500, s.group) end
    removed = removed + in_steps('XDEL', stream, s.ids, 500)
  end
  for key, values in pairs(B.ids) do in_steps('HSET', key, values, 1000) end
  for key, rids in pairs(B.gone_ids) do in_steps('HDEL', key, rids, 500) end
  for key, c in pairs(B.counts) do
    if c.used ~= 0 then redis.call('HINCRBY', key, 'sink_used', c.used) end
    if c.bytes ~= 0 then redis.call('HINCRBY', key, 'sink_bytes', c.bytes) end
  end
  B.streams, B.order, B.ids, B.gone_ids, B.counts = {}, {}, {}, {}, {}
  return removed
end

-- Gathers entry `id` of `stream` (acknowledged in `group` too, when given and not `acked` already); false
-- when gathered already.
local function gather(B, stream, id, group, acked)
  if B.seen[stream .. ' ' .. id] then return false end
  B.seen[stream .. ' ' .. id] = true
  local s = B.streams[stream]
  if not s then
    s = {ids = {}, acks = {}, group = group}
    B.streams[stream] = s
    B.order[#B.order + 1] = stream
  end
  s.ids[#s.ids + 1] = id
  if not acked then s.acks[#s.acks + 1] = id end
  return true
end

-- Remove one item for good and keep the counters true. Q = {stream, ids, counts, kind ('input'|'sink'),
-- high (bool), held (bool: the caller holds it), acked (bool: and acknowledged it already)}. Input: the
-- workers' group forgets it: a held item gives back the sink room its result had (unless `room_used`: its
-- result is written), an item no worker held was waiting. Sink: its room and bytes are freed, and its
-- request id remembers when it went and how it ended (`-<ms>:<status>`). `group`, a client group, forgets it
-- too; other client groups find it gone when they next look (no script scans every group). With `B`
-- (new_removals) a sink item's removal, or a held input item's, is gathered there, to go at flush_removals.
-- Returns how many entries it removes (0 for one gathered already).
local function remove_item(Q, id, f, group, now_ms, room_used, B)
  local client_group = nil
  if group ~= nil and group ~= '' and group ~= WORKER_GROUP then client_group = group end
  if Q.kind == 'input' and not (B and Q.held) then
    if f['rid'] then redis.call('HDEL', Q.ids, f['rid']) end
    if redis.call('XACK', Q.stream, WORKER_GROUP, id) == 1 then
      if not f['reply'] and not room_used then redis.call('HINCRBY', Q.counts, 'sink_used', -1) end
    else
      redis.call('HINCRBY', Q.counts, 'waiting', -1)
      if Q.high then redis.call('HINCRBY', Q.counts, 'waiting_high', -1) end
    end
    if client_group then redis.call('XACK', Q.stream, client_group, id) end
    return redis.call('XDEL', Q.stream, id)
  end
  local flush = B == nil
  B = B or new_removals()
  if Q.kind == 'input' then
    if not gather(B, Q.stream, id, WORKER_GROUP, Q.acked) then return 0 end
    if f['rid'] then
      B.gone_ids[Q.ids] = B.gone_ids[Q.ids] or {}
      table.insert(B.gone_ids[Q.ids], f['rid'])
    end
    if not f['reply'] and not room_used then
      local c = removal_counts(B, Q.counts)
      c.used = c.used - 1
    end
    return 1
  end
  if not gather(B, Q.stream, id, client_group) then return 0 end
  if f['rid'] then
    -- `:<end>` (expired) says how a request ended where its status code alone does not.
    local ending = ''
    if f['end'] then ending = ':' .. f['end'] end
    B.ids[Q.ids] = B.ids[Q.ids] or {}
    local r = B.ids[Q.ids]
    r[#r + 1] = f['rid']
    r[#r + 1] = '-' .. now_ms .. ':' .. (f['code'] or '200') .. ending
  end
  local c = removal_counts(B, Q.counts)
  c.used = c.used - 1
  c.bytes = c.bytes - #(f['data'] or '')
  if flush then return flush_removals(B) end
  return 1
end

-- Items of `group` waiting ahead of entry `id` of stream number `i` (1 = priority, 2 = normal): the
-- undelivered part of the priority stream (for a normal item), then the undelivered items before it.
-- Counted up to `cap`.
local function ahead_of(streams, i, id, group, cap)
  local ahead = 0
  for j = 1, i do
    local from = '-'
    local info = redis.pcall('XINFO', 'GROUPS', streams[j])
    if not info['err'] then
      for _, g in ipairs(info) do
        local gf = fields_of(g)
        if gf['name'] == group then from = '(' .. gf['last-delivered-id'] end
      end
    end
    local upto = '+'
    if j == i then upto = '(' .. id end
    ahead = ahead + #redis.call('XRANGE', streams[j], from, upto, 'COUNT', cap - ahead)
    if ahead >= cap then return ahead end
  end
  return ahead
end

-- Redis's clock in ms: the one clock deadlines are set and checked by (API and worker hosts' clocks differ).
local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function ms(value)
  return string.format('%d', value)
end

-- Webhook deliveries of one event of a request, written in the step that causes the event, so that a crash
-- cannot lose one. `hooks` is the item's `hooks` field: a JSON list of targets {url ('' = the service's own
-- webhook), events}; one delivery per target that asked for `event`. H = {stream, requests} (keys.webhooks);
-- `facts` a flat list field, value, ... copied into each delivery. Returns how many were enqueued.
local function enqueue_hooks(H, hooks, event, rid, now_ms, facts)
  if not hooks or hooks == '' then return 0 end
  local n, state = 0, nil
  for i, target in ipairs(cjson.decode(hooks)) do
    for _, wanted in ipairs(target['events'] or {}) do
      if wanted == event then
        local fields = {'event', event, 'target', tostring(i), 'url', target['url'] or '', 'rid', rid, 'ts', now_ms}
        for j = 1, #facts do fields[#fields + 1] = facts[j] end
        redis.call('XADD', H.stream, '*', unpack(fields))
        state = state or cjson.decode(redis.call('HGET', H.requests, rid) or '{}')
        state[event .. '/' .. i] = {state = 'pending', attempts = 0, at = tonumber(now_ms)}
        n = n + 1
      end
    end
  end
  if state then redis.call('HSET', H.requests, rid, cjson.encode(state)) end
  return n
end

-- The `webhook-id` of a delivery: the same on every attempt, and kept when a dead letter is retried by hand.
local function webhook_id(entry_id, f)
  return f['wid'] or ('msg_' .. (f['rid'] or '') .. '_' .. entry_id)
end
