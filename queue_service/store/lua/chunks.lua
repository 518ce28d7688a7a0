-- What one request streams while it runs: append chunks and progress, or end the stream with its done entry.
-- Each entry has `k` (c chunk, p progress, r restart, d done) and `dl` (the delivery that wrote it); a chunk
-- also `e` (t text, b bytes, j JSON) and `v`; progress and done `v` (JSON). The first write of a new delivery
-- (the request was handed over) adds a restart entry and trims what the earlier delivery wrote, so the stream
-- holds one delivery's output (capped in bytes by the worker); a write of an earlier delivery than the
-- stream's (a worker that stalled past its lease) is refused. Entry ids are the stream's own (`<ms>-<n>`).
-- An append of a request whose webhooks ask for `progress` or `output` enqueues that event's deliveries in
-- the same step (enqueue_hooks), at most one per event per `gap_ms`: a gate key SET NX PX gap_ms.
-- KEYS: chunks, progress, webhooks stream, webhooks requests, progress gate, output gate
-- ARGV: mode ('append' | 'end'), delivery, ttl_ms, then
--   append: progress_json ('' none), hooks ('' none: no progress/output webhooks), events wanted
--           ('progress', 'output' or both, comma-separated), gap_ms, rid, index, put_ms, start_ms, streamed bytes
--           (of chunks so far, as the worker counts them), inline bytes (webhook.max_result_bytes), then
--           (kind, encoding, value) per entry ('c' chunks; 'p' progress)
--   end:    done_json, if_exists ('1': only when the stream exists, i.e. something was streamed)
-- Returns 1 written, 0 refused (a later delivery writes this stream, or nothing to end).
local mode, delivery, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local FIRST_ENTRY = 14

local function own(stream)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #last == 0 then return true end
  local current = tonumber(fields_of(last[1][2])['dl']) or 1
  if current > delivery then return false end
  if current < delivery then
    local restart = redis.call('XADD', stream, '*', 'k', 'r', 'dl', delivery)
    redis.call('XTRIM', KEYS[1], 'MINID', restart)
  end
  return true
end

-- This delivery's chunks joined as its result will be (text and bytes as they are, JSON chunks one a line),
-- and the encodings seen; nil when they come to more than `limit` bytes.
local function output_so_far(limit)
  local parts, size, kinds, from = {}, 0, {}, '-'
  while true do
    local page = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', 256)
    for _, e in ipairs(page) do
      local f = fields_of(e[2])
      if f['k'] == 'c' and tonumber(f['dl']) == delivery then
        local v = f['v']
        if f['e'] == 'j' then v = v .. '\n' end
        size = size + #v
        if size > limit then return nil end
        parts[#parts + 1] = v
        kinds[f['e']] = true
      end
    end
    if #page < 256 then break end
    from = '(' .. page[#page][1]
  end
  local seen = ''
  for _, k in ipairs({'t', 'b', 'j'}) do
    if kinds[k] then seen = seen .. k end
  end
  return table.concat(parts), seen
end

local function gate_open(key, gap)
  return redis.call('SET', key, '1', 'NX', 'PX', gap) ~= false
end

-- The `progress` and `output` webhooks of this append (see the header).
local function hooks_of_append(progress, chunked)
  local events, gap = ARGV[6], ARGV[7]
  local wants_progress = progress ~= '' and string.find(events, 'progress', 1, true) ~= nil
  local wants_output = chunked and string.find(events, 'output', 1, true) ~= nil
  if not wants_progress and not wants_output then return end
  local H = {stream = KEYS[3], requests = KEYS[4]}
  local now = ms(redis_now_ms())
  local rid = ARGV[8]
  local base = {'index', ARGV[9], 'put', ARGV[10], 'start', ARGV[11], 'deliveries', tostring(delivery)}
  if wants_progress and gate_open(KEYS[5], gap) then
    local facts = {unpack(base)}
    facts[#facts + 1] = 'progress'
    facts[#facts + 1] = progress
    enqueue_hooks(H, ARGV[5], 'progress', rid, now, facts)
  end
  if wants_output and gate_open(KEYS[6], gap) then
    local facts = {unpack(base)}
    local last = progress
    if last == '' then last = redis.call('GET', KEYS[2]) or '' end
    if last ~= '' then
      facts[#facts + 1] = 'progress'
      facts[#facts + 1] = last
    end
    local limit = tonumber(ARGV[13])
    local output, kinds = nil, nil
    if tonumber(ARGV[12]) <= limit then output, kinds = output_so_far(limit) end
    if output then
      for _, v in ipairs({'output', output, 'osize', tostring(#output), 'okinds', kinds}) do facts[#facts + 1] = v end
    else
      for _, v in ipairs({'ostream', '1', 'osize', ARGV[12]}) do facts[#facts + 1] = v end
    end
    enqueue_hooks(H, ARGV[5], 'output', rid, now, facts)
  end
end

if mode == 'end' then
  if ARGV[5] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  if not own(KEYS[1]) then return 0 end
  redis.call('XADD', KEYS[1], '*', 'k', 'd', 'dl', delivery, 'v', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ttl)
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ttl) end
  return 1
end

if not own(KEYS[1]) then return 0 end
local chunked = false
for i = FIRST_ENTRY, #ARGV, 3 do
  if ARGV[i] == 'c' then
    redis.call('XADD', KEYS[1], '*', 'k', 'c', 'dl', delivery, 'e', ARGV[i + 1], 'v', ARGV[i + 2])
    chunked = true
  else
    redis.call('XADD', KEYS[1], '*', 'k', 'p', 'dl', delivery, 'v', ARGV[i + 2])
  end
end
redis.call('PEXPIRE', KEYS[1], ttl)
if ARGV[4] ~= '' then redis.call('SET', KEYS[2], ARGV[4], 'PX', ttl) end
if ARGV[5] ~= '' then hooks_of_append(ARGV[4], chunked) end
return 1
