-- A consumer of a client group arrives. A new group is created on both streams, starting at index `start`
-- (0: the head), and every group is marked seen now. A queue keeps at most `max_groups` client groups: a
-- new one replaces the group seen longest ago if no consumer of that one has been seen for `idle_ms`,
-- else it is refused. Scripts on the hot path never look at the groups, so their number costs nothing there.
-- Each watch connection is a consumer of its own (keys.connection_consumer); a connection that closes holding
-- nothing drops its consumer (held.lua), and one that held items leaves an empty consumer behind once another
-- takes them: past PRUNE_PAST consumers, those holding nothing and idle `idle_ms` are dropped here (a live one
-- that reads again is created anew).
-- KEYS: high, normal, groups (sorted set: group -> last seen ms)
-- ARGV: group, start_id, now_ms, max_groups, idle_ms
-- Returns 1 (created), 0 (it existed), -1 (refused: too many groups with live consumers).
local group, start, now_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_groups, idle_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local PRUNE_PAST = 64

-- How many consumers `group` has on `stream` (0 when the stream or the group does not exist).
local function consumers_of(stream)
  local info = redis.pcall('XINFO', 'GROUPS', stream)
  if info['err'] then return 0 end
  for _, g in ipairs(info) do
    local gf = fields_of(g)
    if gf['name'] == group then return gf['consumers'] end
  end
  return 0
end
if redis.call('ZSCORE', KEYS[3], group) then
  redis.call('ZADD', KEYS[3], now_ms, group)
  for i = 1, 2 do
    redis.pcall('XGROUP', 'CREATE', KEYS[i], group, start, 'MKSTREAM')
    if consumers_of(KEYS[i]) > PRUNE_PAST then
      for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[i], group)) do
        local cf = fields_of(c)
        if cf['pending'] == 0 and cf['idle'] > idle_ms then
          redis.call('XGROUP', 'DELCONSUMER', KEYS[i], group, cf['name'])
        end
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
