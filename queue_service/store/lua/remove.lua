-- Remove items: delete, commit, truncate, withdraw, or the items an auto-deleting read has answered.
-- KEYS: high, normal, ids, counts, reserved; for 'cancel' also the sink's ids, the webhooks stream and
--       requests hash (any keys of the service otherwise)
-- ARGV: kind (input|sink), mode, group ('' or the caller's client group), now_ms, token, values...
--   'indexes':  these indexes
--   'cancel':   these input indexes: a request no worker holds ends here (its request id remembers it was
--               cancelled, 499, and its `completed` webhooks are enqueued); a held one is removed, and its
--               worker, told at its next lease renewal, writes the terminal answer
--   'waiting':  these indexes, only while no worker holds them (withdrawing a sync request)
--   'below':    items below index values[1], at most values[2] of them (truncate, in steps)
--   'reserved': these indexes, only while `token` reserves them (an auto-deleting read, once answered)
--   'release':  drop `token`'s reservation of these indexes (the reader's client left before the answer)
-- Returns {removed, more (1 when 'below' stopped at its step)}.
local kind, mode, group, now_ms, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local CANCELLED_WAITING = 'cancelled: deleted from the input queue before any worker started it'
local removed = 0
local B = new_removals()

local function queue(i)
  return {stream = KEYS[i], ids = KEYS[3], counts = KEYS[4], kind = kind, high = i == 1}
end

local function reserved_by_me(index)
  local r = redis.call('HGET', KEYS[5], index)
  return r and string.sub(r, string.find(r, ':') + 1) == token
end

if mode == 'below' then
  local step, more = tonumber(ARGV[7]), 0
  for i = 1, 2 do
    local page = redis.call('XRANGE', KEYS[i], '-', '(' .. sid(ARGV[6]), 'COUNT', step - removed)
    for _, e in ipairs(page) do
      removed = removed + remove_item(queue(i), e[1], fields_of(e[2]), group, now_ms, false, B)
    end
    if removed >= step then
      more = 1
      break
    end
  end
  flush_removals(B)
  return {removed, more}
end

-- A dense run of indexes (a commit of a watch window nearly always is one) reads the normal stream's part of
-- it with one XRANGE, not one per index; keyed by number, as XRANGE reads the ids it is given.
local normal = nil
local named = #ARGV - 5
if named >= 4 then
  local lo, hi = nil, nil
  for j = 6, #ARGV do
    local v = tonumber(ARGV[j])
    if v then lo, hi = math.min(lo or v, v), math.max(hi or v, v) end
  end
  if lo and hi - lo < 4 * named then
    normal = {}
    for _, e in ipairs(redis.call('XRANGE', KEYS[2], sid(lo), sid(hi))) do
      normal[tonumber(string.match(e[1], '^(%d+)'))] = e[2]
    end
  end
end

-- An entry read from the run is used once: an index named twice is not there the second time, as an XRANGE
-- after the first one's XDEL would find.
local function entry_of(i, index, id)
  if i == 2 and normal then
    local n = tonumber(index)
    local flat = normal[n]
    if flat == nil then return nil end
    normal[n] = nil
    return fields_of(flat)
  end
  return entry(KEYS[i], id)
end

for j = 6, #ARGV do
  local index = ARGV[j]
  if mode == 'release' or mode == 'reserved' then
    local mine = reserved_by_me(index)
    if mine then redis.call('HDEL', KEYS[5], index) end
    if mode == 'release' or not mine then index = nil end
  end
  if index then
    local id = sid(index)
    -- The normal stream first (nearly every item is there); an index lives in one stream only.
    for _, i in ipairs({2, 1}) do
      local f = entry_of(i, index, id)
      if f then
        local held = (mode == 'waiting' or mode == 'cancel') and owner_of(KEYS[i], WORKER_GROUP, id)
        if not (mode == 'waiting' and held) then
          removed = removed + remove_item(queue(i), id, f, group, now_ms, false, B)
        end
        if mode == 'cancel' and not held and f['rid'] and not f['reply'] then
          redis.call('HSET', KEYS[6], f['rid'], '-' .. now_ms .. ':499')
          enqueue_hooks({stream = KEYS[7], requests = KEYS[8]}, f['hooks'], 'completed', f['rid'], now_ms,
            {'index', index, 'code', '499', 'message', CANCELLED_WAITING, 'tags', f['tags'] or '{}',
             'put', f['ts'] or '0', 'deliveries', '0', 'size', '0'})
        end
        break
      end
    end
  end
end
flush_removals(B)
return {removed, 0}
