-- Put one item: bound check and write in one atomic step, so concurrent putters never
-- overshoot the bound.
-- KEYS: high, normal, seq, ids
-- ARGV: data, tags_json, request_id, ts_ms, priority(1|0), bound(0 = none),
--       bound_mode(waiting|length), worker_group, reply(''|'1')
local bound, mode, group = tonumber(ARGV[6]), ARGV[7], ARGV[8]
-- Idempotent per request id: a client library that resends after a lost answer gets the same
-- index instead of a second copy of the item.
local existing = redis.call('HGET', KEYS[4], ARGV[3])
if existing then return tonumber(existing) end
local used = 0
for i = 1, 2 do
  used = used + redis.call('XLEN', KEYS[i])
  if mode == 'waiting' then
    -- Waiting = put but not yet taken by a worker = length - workers' pending.
    used = used - tonumber(ensure_group(KEYS[i], group)['pending'])
  end
end
if bound > 0 and used >= bound then return -1 end
local index = redis.call('INCR', KEYS[3])
local target = KEYS[2]
if ARGV[5] == '1' then target = KEYS[1] end
local fields = {'data', ARGV[1], 'tags', ARGV[2], 'rid', ARGV[3], 'ts', ARGV[4]}
if ARGV[9] ~= '' then
  fields[#fields + 1] = 'reply'
  fields[#fields + 1] = ARGV[9]
end
redis.call('XADD', target, index .. '-0', unpack(fields))
redis.call('HSET', KEYS[4], ARGV[3], index)
return index
