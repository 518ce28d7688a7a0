-- Where an item stands for one consumer group: {holder, 1 if delivered and not committed, items waiting
-- ahead of it}, or false when the queue has no such index. The workers' names are theirs: a worker holding
-- the item shows as holder ''.
-- KEYS: high, normal
-- ARGV: index, group, cap (most items counted ahead)
local id, group, cap = sid(ARGV[1]), ARGV[2], tonumber(ARGV[3])
for i = 1, 2 do
  if entry(KEYS[i], id) then
    local holder = owner_of(KEYS[i], group, id)
    if holder then
      if group == WORKER_GROUP then holder = '' end
      return {holder, 1, 0}
    end
    return {'', 0, ahead_of(KEYS, i, id, group, cap)}
  end
end
return false
