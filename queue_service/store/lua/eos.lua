-- End of stream (`_eos_`): a queue's stream ends after the last index given out. Puts are refused from then on
-- (put.lua); what was put before the end is still delivered, and a watcher sees the end once none of it is left.
-- KEYS: high, normal, seq, end
-- ARGV: mode ('end' | 'check' | 'lift'), below (lift: the index a truncate removed everything below)
--   'end':   record the end at the last index given out (a queue that has ended keeps its end); returns it.
--   'check': returns {the end index (-1: the queue is open), 1 while an item put before the end is still there}.
--   'lift':  a truncate past the end (below > the end index) reopens the queue; returns 1 when it did.
local mode = ARGV[1]
local ended = redis.call('GET', KEYS[4])
if mode == 'end' then
  if not ended then
    ended = string.format('%d', num(redis.call('GET', KEYS[3])))
    redis.call('SET', KEYS[4], ended)
  end
  return ended
end
if mode == 'lift' then
  if ended and num(ended) < num(ARGV[2]) then
    redis.call('DEL', KEYS[4])
    return 1
  end
  return 0
end
if not ended then return {-1, 0} end
for i = 1, 2 do
  if #redis.call('XRANGE', KEYS[i], '-', sid(ended), 'COUNT', 1) > 0 then return {ended, 1} end
end
return {ended, 0}
