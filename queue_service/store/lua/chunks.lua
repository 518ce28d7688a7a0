-- What one request streams while it runs: append chunks and progress, or end the stream with its done entry.
-- Each entry has `k` (c chunk, p progress, r restart, d done) and `dl` (the delivery that wrote it); a chunk
-- also `e` (t text, b bytes, j JSON) and `v`; progress and done `v` (JSON). The first write of a new delivery
-- (the request was handed over) adds a restart entry and trims what the earlier delivery wrote, so the stream
-- holds one delivery's output (capped in bytes by the worker); a write of an earlier delivery than the
-- stream's (a worker that stalled past its lease) is refused. Entry ids are the stream's own (`<ms>-<n>`).
-- KEYS: chunks, progress
-- ARGV: mode ('append' | 'end'), delivery, ttl_ms, then
--   append: progress_json ('' none), then (kind, encoding, value) per entry ('c' chunks; 'p' progress)
--   end:    done_json, if_exists ('1': only when the stream exists, i.e. something was streamed)
-- Returns 1 written, 0 refused (a later delivery writes this stream, or nothing to end).
local mode, delivery, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3]

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

if mode == 'end' then
  if ARGV[5] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  if not own(KEYS[1]) then return 0 end
  redis.call('XADD', KEYS[1], '*', 'k', 'd', 'dl', delivery, 'v', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ttl)
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ttl) end
  return 1
end

if not own(KEYS[1]) then return 0 end
for i = 5, #ARGV, 3 do
  if ARGV[i] == 'c' then
    redis.call('XADD', KEYS[1], '*', 'k', 'c', 'dl', delivery, 'e', ARGV[i + 1], 'v', ARGV[i + 2])
  else
    redis.call('XADD', KEYS[1], '*', 'k', 'p', 'dl', delivery, 'v', ARGV[i + 2])
  end
end
redis.call('PEXPIRE', KEYS[1], ttl)
if ARGV[4] ~= '' then redis.call('SET', KEYS[2], ARGV[4], 'PX', ttl) end
return 1
