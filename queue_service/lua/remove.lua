-- Remove items (delete, commit, truncate, withdraw). Returns how many were removed.
-- KEYS: high, normal, ids
-- ARGV: mode, worker_group, values...
--   mode 'indexes': remove these indexes
--   mode 'waiting': remove these indexes only if no worker has taken them yet (withdraw)
--   mode 'below':   remove every item whose index is below values[1] (truncate)
local mode, group = ARGV[1], ARGV[2]
local removed = 0
if mode == 'below' then
  local limit = tonumber(ARGV[3]) - 1
  if limit < 1 then return 0 end
  for i = 1, 2 do
    for _, e in ipairs(redis.call('XRANGE', KEYS[i], '-', limit .. '-0')) do
      removed = removed + remove_entry(KEYS[i], KEYS[3], e[1], fields_of(e[2]))
    end
  end
  return removed
end
for j = 3, #ARGV do
  local id = ARGV[j] .. '-0'
  for i = 1, 2 do
    local f = entry(KEYS[i], id)
    if f then
      local started = mode == 'waiting' and find_group(KEYS[i], group) and owner_of(KEYS[i], group, id)
      if not started then removed = removed + remove_entry(KEYS[i], KEYS[3], id, f) end
    end
  end
end
return removed
