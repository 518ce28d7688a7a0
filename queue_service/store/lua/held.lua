-- The items one consumer of a client group holds (delivered, not committed). Those that are gone (removed
-- by another group's commit, or deleted) are acknowledged and no longer take a place in its window.
-- mode 'count' counts them, 'renew' also extends their lease, 'release' makes them claimable at once
-- (the consumer left: another consumer of the group takes them). A consumer that leaves holding nothing is
-- dropped from the group (each watch connection is a consumer of its own: keys.connection_consumer).
-- KEYS: high, normal
-- ARGV: group, consumer, mode (count|renew|release), max, release_idle_ms
-- Returns the number held (after 'release': how many were released).
local group, consumer, mode, max = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local held, listed = 0, 0
for i = 1, 2 do
  local p = redis.pcall('XPENDING', KEYS[i], group, '-', '+', max, consumer)
  if not p['err'] then
    listed = listed + #p
    for _, pending in ipairs(p) do
      local id = pending[1]
      if #redis.call('XRANGE', KEYS[i], id, id) == 0 then
        redis.call('XACK', KEYS[i], group, id)
      else
        held = held + 1
        if mode == 'renew' then
          redis.call('XCLAIM', KEYS[i], group, consumer, 0, id, 'IDLE', 0, 'JUSTID')
        elseif mode == 'release' then
          redis.call('XCLAIM', KEYS[i], group, consumer, 0, id, 'IDLE', ARGV[5], 'JUSTID')
        end
      end
    end
  end
end
if mode == 'release' and held == 0 and listed < max then
  for i = 1, 2 do redis.pcall('XGROUP', 'DELCONSUMER', KEYS[i], group, consumer) end
end
return held
