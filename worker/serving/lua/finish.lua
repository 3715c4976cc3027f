-- End a job (succeeded, failed, expired, cancelled) with its result or error: the first final write wins,
-- so a redelivered job cannot produce a second, different result.
-- KEYS: the job's record, its chunks stream.
-- ARGV: state, now, ttl, field name ('result', 'error' or ''), its JSON, the job's channel, request JSON or ''
--   (the record's request, when the job has no record yet), end event JSON, '1' for a streaming job (its
--   stream gets the end event even if it sent no chunk), '0' for one that does not stream, '' when not known
--   (its stream is looked for).
-- Returns 'ok', or the final state already there.
-- include: finalize

local state = rec('state')
if state and FINAL[state] then
  return state
end
if ARGV[7] ~= '' and not state then
  rec_set('request', ARGV[7], 'created_at', ARGV[2], 'attempts', 0)
end
local streaming = nil
if ARGV[9] ~= '' then
  streaming = ARGV[9] == '1'
end
finalize(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[8], streaming)
return 'ok'
