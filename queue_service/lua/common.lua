-- Helpers prepended to every script of this folder (see queue_service/scripts.py).

local function fields_of(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end

local function groups_of(stream)
  if redis.call('EXISTS', stream) == 0 then return {} end
  local out = {}
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do out[#out + 1] = fields_of(g) end
  return out
end

local function find_group(stream, group)
  for _, g in ipairs(groups_of(stream)) do
    if g['name'] == group then return g end
  end
  return nil
end

local function ensure_group(stream, group)
  local g = find_group(stream, group)
  if g then return g end
  redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  return {name = group, pending = 0, ['last-delivered-id'] = '0-0'}
end

local function entry(stream, id)
  local e = redis.call('XRANGE', stream, id, id)
  if #e == 0 then return nil end
  return fields_of(e[1][2])
end

-- Remove one item for good. Every group forgets it too, so that no pending list keeps a
-- ghost: admission counts waiting items as stream length minus the workers' pending count.
local function remove_entry(stream, ids_key, id, fields)
  if fields and fields['rid'] then redis.call('HDEL', ids_key, fields['rid']) end
  for _, g in ipairs(groups_of(stream)) do redis.call('XACK', stream, g['name'], id) end
  return redis.call('XDEL', stream, id)
end

local function owner_of(stream, group, id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if #p == 0 then return nil end
  return p[1][2]
end
