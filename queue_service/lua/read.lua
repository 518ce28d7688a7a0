-- Read items from index `start` (or the one item of a request id), filtered by tags, and
-- optionally delete what was returned in the same step (two auto-deleting readers never get
-- the same item). Returns {last index given out, {{id, fields}...}}.
-- KEYS: high, normal, ids, seq
-- ARGV: start, length, request_id(''), delete(1|0), tag_filter_json('')
local start, length, rid = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local filter = nil
if ARGV[5] ~= '' then filter = cjson.decode(ARGV[5]) end

local function matches(f)
  if not filter then return true end
  local tags = cjson.decode(f['tags'] or '{}')
  for k, v in pairs(filter) do
    if tags[k] ~= v then return false end
  end
  return true
end

local out = {}
local function consider(stream, e)
  local f = fields_of(e[2])
  if #out < length and matches(f) then
    out[#out + 1] = e
    if ARGV[4] == '1' then remove_entry(stream, KEYS[3], e[1], f) end
  end
end

if rid ~= '' then
  local idx = redis.call('HGET', KEYS[3], rid)
  if idx then
    for i = 1, 2 do
      for _, e in ipairs(redis.call('XRANGE', KEYS[i], idx .. '-0', idx .. '-0')) do consider(KEYS[i], e) end
    end
  end
else
  for i = 1, 2 do
    local cursor = start .. '-0'
    -- Bounded scan: a tag filter that matches nothing must not walk a huge stream.
    for _ = 1, 50 do
      if #out >= length then break end
      local page = redis.call('XRANGE', KEYS[i], cursor, '+', 'COUNT', 100)
      if #page == 0 then break end
      for _, e in ipairs(page) do consider(KEYS[i], e) end
      cursor = '(' .. page[#page][1]
    end
  end
end
return {redis.call('GET', KEYS[4]) or '0', out}
