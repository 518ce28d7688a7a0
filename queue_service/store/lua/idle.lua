-- A worker is about to wait for the bell of a service: count it idle until `until_s`, and ring the bell now
-- if an item was put since the worker last looked (after index `last`): that put saw no idle worker and
-- rang nothing, and the worker must not sleep through it.
-- KEYS: idle workers, seq, bell
-- ARGV: consumer, until_s, last, now_s
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
if num(redis.call('GET', KEYS[2])) > num(ARGV[3]) then
  redis.call('XADD', KEYS[3], 'MAXLEN', '1', '*', 'r', '1')
end
return 1
