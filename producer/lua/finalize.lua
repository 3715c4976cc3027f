-- Fragment: writing a final state.
--   finalize(state, now, ttl, field, payload, channel, end_event, streaming): the record's state, finish time,
--     'field' ('result', 'error', or '' for none) set to 'payload', and its expiry; the end event on the chunks
--     stream (when the job streams, or has streamed) and on the job's channel; its batch's counts and its
--     webhook events; and the cluster-wide count of ended jobs (stats.lua). The caller has checked that the
--     record is not final yet.
-- KEYS[1]: the job's record, KEYS[2]: its chunks stream. ARGV: none of its own.
-- include: batch_move
-- include: stats

local function finalize(state, now, ttl, field, payload, channel, end_event, streaming)
  batch_move(redis.call('HGET', KEYS[1], 'state'), state)
  stop_waiting()
  redis.call('HSET', KEYS[1], 'state', state, 'finished_at', now)
  count_ended(state, field, payload)
  if field ~= '' then
    redis.call('HSET', KEYS[1], field, payload)
  end
  redis.call('EXPIRE', KEYS[1], ttl)
  if streaming or redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('XADD', KEYS[2], '*', 'event', end_event)
    redis.call('EXPIRE', KEYS[2], ttl)
  end
  redis.call('PUBLISH', channel, end_event)
  local job_id = redis.call('HGET', KEYS[1], 'job_id') or ''
  if state == 'succeeded' then
    webhook_event(KEYS[1], 'job', job_id, 'output')
  end
  webhook_event(KEYS[1], 'job', job_id, 'completed')
end
