-- Fragment: writing a final state.
--   finalize(state, now, ttl, field, payload, channel, end_event, streaming): the record's state, finish time,
--     'field' ('result', 'error', or '' for none) set to 'payload', and its expiry; the end event on the chunks
--     stream (when the job streams, or has streamed) and on the job's channel; its batch's counts and its
--     webhook events; and the cluster-wide count of ended jobs (stats.lua). The caller has checked that the
--     record is not final yet. 'streaming': whether the job streams (or has streamed, a 'stream' request
--     whose attempt may have written chunks); nil: not known, its stream is looked for.
-- KEYS[1]: the job's record, KEYS[2]: its chunks stream. ARGV: none of its own.
-- include: batch_move
-- include: stats

local function finalize(state, now, ttl, field, payload, channel, end_event, streaming)
  local was = rec('state')
  batch_move(was, state)
  if was ~= 'running' then  -- (a job leaves its queue's waiting set when it starts)
    stop_waiting()
  end
  if field ~= '' then
    rec_set('state', state, 'finished_at', now, field, payload)
  else
    rec_set('state', state, 'finished_at', now)
  end
  count_ended(state, field, payload)
  redis.call('EXPIRE', KEYS[1], ttl)
  if streaming == nil then
    streaming = redis.call('EXISTS', KEYS[2]) == 1
  end
  if streaming then
    redis.call('XADD', KEYS[2], '*', 'event', end_event)
    redis.call('EXPIRE', KEYS[2], ttl)
  end
  redis.call('PUBLISH', channel, end_event)
  local job_id = job_id_of_record()
  if state == 'succeeded' then
    webhook_event(KEYS[1], 'job', job_id, 'output')
  end
  webhook_event(KEYS[1], 'job', job_id, 'completed')
end
