-- Renew (idle_ms = 0) or release (idle_ms large: claimable at once) the caller's hold on items.
-- Returns {held, gone}: how many the caller still holds, and how many no longer exist (removed while held:
-- cancelled). The rest were handed to another consumer after their lease lapsed.
-- KEYS: stream
-- ARGV: group, consumer, idle_ms, id...
local held, gone = 0, 0
for i = 4, #ARGV do
  if owner_of(KEYS[1], ARGV[1], ARGV[i]) == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    held = held + 1
  elseif #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) == 0 then
    gone = gone + 1
  end
end
return {held, gone}
