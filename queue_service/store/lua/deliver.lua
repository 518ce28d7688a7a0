-- Deliver up to `want` items to one consumer of a client group (a watch): first, when `lease_ms` > 0, items
-- whose lease lapsed (a consumer that left without committing, or a crashed API), then new ones; priority
-- stream first; at most `max_bytes` of data (always at least one item). Items that do not match the
-- consumer's tag filter are acknowledged for the group: it is done with them.
-- With `watch_end`, a call that delivers nothing also says whether the queue's stream has ended (eos.lua) and
-- whether anything put before the end is left: an idle watch learns of the end without a call of its own.
-- KEYS: high, normal, end (the queue's end-of-stream marker)
-- ARGV: group, consumer, want, lease_ms (0: no lapsed items), restart_guard_ms (''), tag_filter_json (''),
--       max_bytes, watch_end (1|0)
-- Returns, packed (lib.lua), {'ok', {{stream, id, fields}...}[, end index (-1: open), 1 while items put
-- before the end are left]}, or {'nogroup'} when the group is gone (it was evicted).
local group, consumer, want = ARGV[1], ARGV[2], tonumber(ARGV[3])
local lease, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[7])
local filter = nil
if ARGV[6] ~= '' then filter = cjson.decode(ARGV[6]) end
local out, bytes = {}, 0

local function wanted(s, e)
  local f = fields_of(e[2])
  if filter then
    local tags = cjson.decode(f['tags'] or '{}')
    if f['rid'] then tags['requestId'] = f['rid'] end
    for k, v in pairs(filter) do
      if tags[k] ~= v then
        redis.call('XACK', s, group, e[1])
        return
      end
    end
  end
  out[#out + 1] = {s, e[1], e[2]}
  bytes = bytes + #(f['data'] or '')
end

if lease > 0 then
  lease = claim_lease(lease, ARGV[5])
  for i = 1, 2 do
    while #out < want and bytes < max_bytes do
      local p = redis.pcall('XPENDING', KEYS[i], group, 'IDLE', lease, '-', '+', 1)
      if p['err'] then return packed({'nogroup'}) end
      if #p == 0 then break end
      local c = redis.call('XCLAIM', KEYS[i], group, consumer, lease, p[1][1])
      if #c > 0 and c[1] then
        wanted(KEYS[i], c[1])
      else
        redis.call('XACK', KEYS[i], group, p[1][1]) -- the entry itself is gone
      end
    end
  end
end

-- New items come in pages of at most PAGE: every entry of a page read is delivered (it is in the consumer's
-- pending list once read), so the byte bound is kept to within one page.
local PAGE = 8
for i = 1, 2 do
  for _ = 1, 1000 do
    if #out >= want or bytes >= max_bytes then break end
    local count = math.min(want - #out, PAGE)
    local r = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', KEYS[i], '>')
    if type(r) == 'table' and r['err'] then return packed({'nogroup'}) end
    if not r then break end
    for _, e in ipairs(r[1][2]) do wanted(KEYS[i], e) end
  end
end
if #out > 0 or ARGV[8] ~= '1' then return packed({'ok', out}) end
local ended = redis.call('GET', KEYS[3])
if not ended then return packed({'ok', out, -1, 0}) end
for i = 1, 2 do
  if #redis.call('XRANGE', KEYS[i], '-', sid(ended), 'COUNT', 1) > 0 then return packed({'ok', out, ended, 1}) end
end
return packed({'ok', out, ended, 0})
