-- What the workers hold now: the pending entries of the workers' group on both input streams, each with its
-- item's request id and put time. Read-only; at most `most` entries per stream.
-- KEYS: high, normal
-- ARGV: most
-- Returns {{stream (1 = priority), entry id, consumer, idle_ms, deliveries, rid, put_ms}...}
local most = tonumber(ARGV[1])
local out = {}
for i = 1, 2 do
  local p = redis.pcall('XPENDING', KEYS[i], WORKER_GROUP, '-', '+', most)
  if type(p) == 'table' and not p['err'] then
    for _, e in ipairs(p) do
      local f = entry(KEYS[i], e[1]) or {}
      out[#out + 1] = {i, e[1], e[2], e[3], e[4], f['rid'] or '', f['ts'] or '0'}
    end
  end
end
return out
