-- The size and the first `max_bytes` of one sink item's data: a result preview that never carries a large
-- result whole into the API process. Read-only.
-- KEYS: high, normal (the sink's)
-- ARGV: index, max_bytes
-- Returns {size, prefix} or false when there is no such item
local id, max_bytes = sid(ARGV[1]), tonumber(ARGV[2])
for i = 1, 2 do
  local f = entry(KEYS[i], id)
  if f then
    local data = f['data'] or ''
    return {#data, string.sub(data, 1, max_bytes)}
  end
end
return false
