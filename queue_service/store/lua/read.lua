-- Read items from index `start` (or the one item of a request id), filtered by tags, up to `length` items and
-- `max_bytes` of data (always at least one item). With `reserve`, what it returns is marked as being
-- answered by `token` for `reserve_ms`, and items another auto-deleting read is answering are skipped: the
-- caller removes its items once the answer is out (remove.lua 'reserved'), or gives them back if its client
-- left; if the caller dies, the reservation lapses and the items are there again. Nothing is lost.
-- KEYS: high, normal, ids, seq, reserved
-- ARGV: start, length, rid ('': by index), reserve (1|0), tag_filter_json (''), max_bytes, now_ms,
--       reserve_ms, token
-- Returns, packed (lib.lua), {last index given out, {{id, fields}...}, found_removed (1 when the request id's
-- result was removed)}.
local length, rid, reserve = tonumber(ARGV[2]), ARGV[3], ARGV[4] == '1'
local max_bytes, now_ms = tonumber(ARGV[6]), tonumber(ARGV[7])
local filter = nil
if ARGV[5] ~= '' then filter = cjson.decode(ARGV[5]) end

local function matches(f)
  if not filter then return true end
  local tags = cjson.decode(f['tags'] or '{}')
  if f['rid'] then tags['requestId'] = f['rid'] end
  for k, v in pairs(filter) do
    if tags[k] ~= v then return false end
  end
  return true
end

local function free(id)
  if not reserve then return true end
  local r = redis.call('HGET', KEYS[5], string.match(id, '^(%d+)'))
  return not r or tonumber(string.match(r, '^(%d+)')) <= now_ms
end

local out, bytes = {}, 0
local function consider(e)
  local f = fields_of(e[2])
  if not (matches(f) and free(e[1])) then return true end
  local size = #(f['data'] or '')
  if #out > 0 and bytes + size > max_bytes then return false end
  out[#out + 1] = e
  bytes = bytes + size
  return #out < length
end

local removed = 0
if rid ~= '' then
  local index = redis.call('HGET', KEYS[3], rid)
  if index and string.sub(index, 1, 1) == '-' then
    removed = 1
  elseif index then
    -- The normal stream first: that is where nearly every item is.
    for _, i in ipairs({2, 1}) do
      local e = redis.call('XRANGE', KEYS[i], sid(index), sid(index))
      if #e > 0 then
        consider(e[1])
        break
      end
    end
  end
else
  local going = true
  for i = 1, 2 do
    local cursor = sid(ARGV[1])
    -- Bounded scan: a tag filter that matches nothing must not walk a huge stream.
    for _ = 1, 50 do
      if not going then break end
      local page = redis.call('XRANGE', KEYS[i], cursor, '+', 'COUNT', 100)
      if #page == 0 then break end
      for _, e in ipairs(page) do
        going = consider(e)
        if not going then break end
      end
      cursor = '(' .. page[#page][1]
    end
  end
end
if reserve then
  local until_ms = string.format('%d', now_ms + tonumber(ARGV[8])) .. ':' .. ARGV[9]
  for _, e in ipairs(out) do redis.call('HSET', KEYS[5], string.match(e[1], '^(%d+)'), until_ms) end
end
return packed({num(redis.call('GET', KEYS[4])), out, removed})
