-- What one request streams while it runs: append chunks and progress, or end the stream with its done entry.
-- Each entry has `k` (c chunk, p progress, r restart, d done) and `dl` (the delivery that wrote it); a chunk
-- also `e` (t text, b bytes, j JSON) and `v`; progress and done `v` (JSON). The first write of a new delivery
-- (the request was handed over) adds a restart entry and trims what the earlier delivery wrote, so the stream
-- holds one delivery's output (capped in bytes by the worker); a write of an earlier delivery than the
-- stream's (a worker that stalled past its lease) is refused. Entry ids are the stream's own (`<ms>-<n>`).
-- An append of a request whose webhooks ask for `progress` or `output` enqueues that event's deliveries in
-- the same step (enqueue_hooks), at most one per event per `gap_ms`: a gate key SET NX PX gap_ms.
-- For `output` the script keeps the output so far (this delivery's chunks joined as its result will be: text
-- and bytes as they are, JSON chunks one a line) in its own key while it is within the inline bytes: one APPEND
-- per write, no rescan of the stream.
-- KEYS: chunks, progress, webhooks stream, webhooks requests, progress gate, output gate, output so far
-- ARGV: mode ('append' | 'end'), delivery, ttl_ms, then
--   append: progress_json ('' none), hooks ('' none: no progress/output webhooks), events wanted
--           ('progress', 'output' or both, comma-separated), gap_ms, rid, index, put_ms, start_ms, output bytes
--           (this delivery's chunks joined so far, this write's included, as the worker counts them), inline
--           bytes (webhook.max_result_bytes), the chunks' encodings so far ('t', 'b', 'j' seen), then
--           (kind, encoding, value) per entry ('c' chunks; 'p' progress)
--   end:    done_json, if_exists ('1': only when the stream exists, i.e. something was streamed)
-- Returns 1 written, 0 refused (a later delivery writes this stream, or nothing to end).
local mode, delivery, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local FIRST_ENTRY = 15

local function own(stream)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #last == 0 then return true end
  local current = tonumber(fields_of(last[1][2])['dl']) or 1
  if current > delivery then return false end
  if current < delivery then
    local restart = redis.call('XADD', stream, '*', 'k', 'r', 'dl', delivery)
    redis.call('XTRIM', KEYS[1], 'MINID', restart)
    redis.call('DEL', KEYS[7]) -- the earlier delivery's output so far
  end
  return true
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
    if tonumber(ARGV[12]) <= tonumber(ARGV[13]) then
      local output = redis.call('GET', KEYS[7]) or ''
      for _, v in ipairs({'output', output, 'osize', tostring(#output), 'okinds', ARGV[14]}) do facts[#facts + 1] = v end
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
  redis.call('DEL', KEYS[7]) -- its `completed` carries the whole result
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ttl) end
  return 1
end

if not own(KEYS[1]) then return 0 end
local chunked = false
-- The output so far, for `output` webhooks: kept while within the inline bytes, dropped past them.
local keep_output = ARGV[5] ~= '' and string.find(ARGV[6], 'output', 1, true) ~= nil
if keep_output and tonumber(ARGV[12]) > tonumber(ARGV[13]) then
  redis.call('DEL', KEYS[7])
  keep_output = false
end
local joined = {}
for i = FIRST_ENTRY, #ARGV, 3 do
  if ARGV[i] == 'c' then
    redis.call('XADD', KEYS[1], '*', 'k', 'c', 'dl', delivery, 'e', ARGV[i + 1], 'v', ARGV[i + 2])
    chunked = true
    if keep_output then
      joined[#joined + 1] = ARGV[i + 2]
      if ARGV[i + 1] == 'j' then joined[#joined + 1] = '\n' end
    end
  else
    redis.call('XADD', KEYS[1], '*', 'k', 'p', 'dl', delivery, 'v', ARGV[i + 2])
  end
end
redis.call('PEXPIRE', KEYS[1], ttl)
if #joined > 0 then
  redis.call('APPEND', KEYS[7], table.concat(joined))
  redis.call('PEXPIRE', KEYS[7], ttl)
end
if ARGV[4] ~= '' then redis.call('SET', KEYS[2], ARGV[4], 'PX', ttl) end
if ARGV[5] ~= '' then hooks_of_append(ARGV[4], chunked) end
return 1
