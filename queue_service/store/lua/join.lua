-- A consumer of a client group arrives. A new group is created on both streams, starting at index `start`
-- (0: the head), and every group is marked seen now. A queue keeps at most `max_groups` client groups: a
-- new one replaces the group seen longest ago if no consumer of that one has been seen for `idle_ms`,
-- else it is refused. Scripts on the hot path never look at the groups, so their number costs nothing there.
-- Each watch connection is a consumer of its own (keys.connection_consumer): the group's consumers that hold
-- nothing and were idle `idle_ms` are dropped here (a live one that reads again is created anew).
-- KEYS: high, normal, groups (sorted set: group -> last seen ms)
-- ARGV: group, start_id, now_ms, max_groups, idle_ms
-- Returns 1 (created), 0 (it existed), -1 (refused: too many groups with live consumers).
local group, start, now_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_groups, idle_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
if redis.call('ZSCORE', KEYS[3], group) then
  redis.call('ZADD', KEYS[3], now_ms, group)
  for i = 1, 2 do
    redis.pcall('XGROUP', 'CREATE', KEYS[i], group, start, 'MKSTREAM')
    local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[i], group)
    if not consumers['err'] then
      for _, c in ipairs(consumers) do
        local cf = fields_of(c)
        if cf['pending'] == 0 and cf['idle'] > idle_ms then redis.call('XGROUP', 'DELCONSUMER', KEYS[i], group, cf['name']) end
      end
    end
  end
  return 0
end
if redis.call('ZCARD', KEYS[3]) >= max_groups then
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if #oldest == 0 or tonumber(oldest[2]) > now_ms - idle_ms then return -1 end
  for i = 1, 2 do redis.pcall('XGROUP', 'DESTROY', KEYS[i], oldest[1]) end
  redis.call('ZREM', KEYS[3], oldest[1])
end
for i = 1, 2 do redis.pcall('XGROUP', 'CREATE', KEYS[i], group, start, 'MKSTREAM') end
redis.call('ZADD', KEYS[3], now_ms, group)
return 1
