-- Renew (idle_ms = 0) or release (idle_ms large: claimable at once) the caller's hold on items.
-- Returns one state per id: 1 the caller still holds it, -1 it no longer exists (removed while held:
-- cancelled), 0 another consumer holds it now (its lease lapsed and it was handed over).
-- KEYS: stream
-- ARGV: group, consumer, idle_ms, id...
local states = {}
for i = 4, #ARGV do
  if owner_of(KEYS[1], ARGV[1], ARGV[i]) == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    states[#states + 1] = 1
  elseif #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) == 0 then
    states[#states + 1] = -1
  else
    states[#states + 1] = 0
  end
end
return states
