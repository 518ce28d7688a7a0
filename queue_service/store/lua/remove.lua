-- Remove items: delete, commit, truncate, withdraw, or the items an auto-deleting read has answered.
-- KEYS: high, normal, ids, counts, reserved
-- ARGV: kind (input|sink), mode, group ('' or the caller's client group), now_ms, token, values...
--   'indexes':  these indexes
--   'waiting':  these indexes, only while no worker holds them (withdrawing a sync request)
--   'below':    items below index values[1], at most values[2] of them (truncate, in steps)
--   'reserved': these indexes, only while `token` reserves them (an auto-deleting read, once answered)
--   'release':  drop `token`'s reservation of these indexes (the reader's client left before the answer)
-- Returns {removed, more (1 when 'below' stopped at its step)}.
local kind, mode, group, now_ms, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local removed = 0

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
      removed = removed + remove_item(queue(i), e[1], fields_of(e[2]), group, now_ms)
    end
    if removed >= step then
      more = 1
      break
    end
  end
  return {removed, more}
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
      local f = entry(KEYS[i], id)
      if f then
        if not (mode == 'waiting' and owner_of(KEYS[i], WORKER_GROUP, id)) then
          removed = removed + remove_item(queue(i), id, f, group, now_ms)
        end
        break
      end
    end
  end
end
return {removed, 0}
