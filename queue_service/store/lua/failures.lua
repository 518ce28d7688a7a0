-- Recent failed results: among the newest `scan` entries of each sink stream, those whose status is not 200,
-- without their data (only its size) and with the message cut to `message_bytes`. Read-only; bounded by `scan`.
-- KEYS: high, normal (the sink's)
-- ARGV: scan, message_bytes
-- Returns {scanned, oldest ts_ms scanned (0: none), {{entry id, rid, ts_ms, code, message, size}...}}
local scan, message_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local scanned, oldest, failed = 0, 0, {}
for i = 1, 2 do
  for _, e in ipairs(redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', scan)) do
    local f = fields_of(e[2])
    local ts = num(f['ts'])
    scanned = scanned + 1
    if oldest == 0 or ts < oldest then oldest = ts end
    local code = f['code'] or '200'
    if code ~= '200' then
      failed[#failed + 1] = {e[1], f['rid'] or '', f['ts'] or '0', code,
        string.sub(f['message'] or '', 1, message_bytes), #(f['data'] or '')}
    end
  end
end
return {scanned, oldest, failed}
