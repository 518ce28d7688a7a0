-- How many items a queue holds (the Java client's `_count_`): both streams, or the priority stream only; with a
-- tag filter, the matching items among the first `cap` of them (the scan stays inside Redis, and bounded).
-- KEYS: high, normal
-- ARGV: priority_only (1|0), tag_filter_json (''), cap
-- Returns the count.
local last = 2
if ARGV[1] == '1' then last = 1 end
if ARGV[2] == '' then
  local n = 0
  for i = 1, last do n = n + redis.call('XLEN', KEYS[i]) end
  return n
end
local filter, cap, seen, n = cjson.decode(ARGV[2]), tonumber(ARGV[3]), 0, 0
for i = 1, last do
  local cursor = '-'
  while seen < cap do
    local page = redis.call('XRANGE', KEYS[i], cursor, '+', 'COUNT', math.min(100, cap - seen))
    if #page == 0 then break end
    for _, e in ipairs(page) do
      local f = fields_of(e[2])
      local tags = cjson.decode(f['tags'] or '{}')
      if f['rid'] then tags['requestId'] = f['rid'] end
      local ok = true
      for k, v in pairs(filter) do
        if tags[k] ~= v then ok = false end
      end
      if ok then n = n + 1 end
    end
    seen = seen + #page
    cursor = '(' .. page[#page][1]
  end
end
return n
