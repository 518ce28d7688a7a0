-- Where an item stands: {consumer holding it or '', 1 if delivered and not committed, items
-- waiting ahead of it}, or nil when the queue has no such index.
-- KEYS: high, normal
-- ARGV: index, group
local id = ARGV[1] .. '-0'
local group = ARGV[2]
for i = 1, 2 do
  if entry(KEYS[i], id) then
    local g = find_group(KEYS[i], group)
    if g then
      local holder = owner_of(KEYS[i], group, id)
      if holder then return {holder, 1, 0} end
    end
    -- Undelivered items ahead: all of the high stream (for a normal item), then the items
    -- between the group's last delivered id and this one.
    local ahead = 0
    for j = 1, i do
      local gj = find_group(KEYS[j], group)
      local from = '-'
      if gj then from = '(' .. gj['last-delivered-id'] end
      local upto = '+'
      if j == i then upto = '(' .. id end
      ahead = ahead + #redis.call('XRANGE', KEYS[j], from, upto)
    end
    return {'', 0, ahead}
  end
end
return nil
