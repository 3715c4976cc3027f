-- Cancel a job (a client's cancel): a queued job ends cancelled here; a running one is flagged
-- ('cancel_requested_at') and its worker told on the cancel channel (it stops at its next decoding step).
-- KEYS: the job's record, its chunks stream.
-- ARGV: now, ttl, the job's channel, end event JSON, error JSON, the cancel channel, job id, '1' when the chunk
--   streams live on shards of their own (producer/stream_shards.py: no end event is written beside the record).
-- Returns 'missing', 'final:<state>' (nothing done), 'cancelled', 'requested' (it generates) or 'requested_held'
-- (a worker holds it, not generating yet: it ends cancelled before it starts).
-- include: finalize

local state = rec('state')
if not state then
  return 'missing'
end
if FINAL[state] then
  return 'final:' .. state
end
rec_set('cancel_requested_at', ARGV[1])
if state == 'queued' then
  local ok, request = pcall(cjson.decode, rec('request') or '')
  local streaming = ok and type(request) == 'table' and request['stream'] == true and ARGV[8] ~= '1'
  finalize('cancelled', ARGV[1], ARGV[2], 'error', ARGV[5], ARGV[3], ARGV[4], streaming)
  return 'cancelled'
end
redis.call('PUBLISH', ARGV[6], ARGV[7])
if held() then
  return 'requested_held'
end
return 'requested'
