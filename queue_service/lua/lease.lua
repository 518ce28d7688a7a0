-- Renew (idle_ms = 0) or release (idle_ms large: claimable at once) the caller's hold on items.
-- Returns how many are still held by the caller; fewer than asked means some were cancelled
-- or handed to another consumer.
-- KEYS: stream
-- ARGV: group, consumer, idle_ms, id...
local held = 0
for i = 4, #ARGV do
  if owner_of(KEYS[1], ARGV[1], ARGV[i]) == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    held = held + 1
  end
end
return held
