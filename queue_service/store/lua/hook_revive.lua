-- Retry dead letters by hand: each goes back into the stream as a new delivery with the same webhook id (and
-- its attempts start again). `ids` empty: the oldest `most` dead letters.
-- KEYS: webhooks stream, dead, requests
-- ARGV: most, ids...
-- Returns how many went back.
local ids = {}
for j = 2, #ARGV do ids[#ids + 1] = ARGV[j] end
if #ids == 0 then ids = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[1]) - 1) end
local now = redis_now_ms()
local revived = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', KEYS[2], id) == 1 then
    local e = redis.call('XRANGE', KEYS[1], id, id)
    if #e > 0 then
      local flat = e[1][2]
      local f = fields_of(flat)
      if not f['wid'] then
        flat[#flat + 1] = 'wid'
        flat[#flat + 1] = webhook_id(id, f)
      end
      redis.call('XADD', KEYS[1], '*', unpack(flat))
      redis.call('XDEL', KEYS[1], id)
      local state = cjson.decode(redis.call('HGET', KEYS[3], f['rid']) or '{}')
      state[f['event'] .. '/' .. f['target']] = {state = 'pending', attempts = 0, at = now}
      redis.call('HSET', KEYS[3], f['rid'], cjson.encode(state))
      revived = revived + 1
    end
  end
end
return revived
