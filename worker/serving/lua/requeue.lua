-- Fragment: a running job back to queued, its message back on its queue.
--   requeue(seq, channel): the record queued again, numbered 'seq' (when given) in its queue's waiting set,
--     so that the sweeper finds it should its message be lost again (worker/serving/sweeper.py); its batch's
--     counts moved back; the state event on the job's 'channel'.
--   requeue_at_head(channel): the same, numbered as the latest started on its queue (its message went back
--     to the head of the queue).
-- KEYS[1]: the job's record. ARGV: none of its own.
-- include: batch_move

local function requeue(seq, channel)
  batch_move('running', 'queued')
  redis.call('HSET', KEYS[1], 'state', 'queued')
  local waiting = redis.call('HGET', KEYS[1], 'k_waiting')
  if waiting and seq then
    redis.call('HSET', KEYS[1], 'seq', seq)
    redis.call('ZADD', waiting, seq, redis.call('HGET', KEYS[1], 'job_id'))
  end
  redis.call('HDEL', KEYS[1], 'started_at', 'worker', 'holder', 'generating')
  redis.call('PUBLISH', channel, cjson.encode({event='state', state='queued'}))
end

local function requeue_at_head(channel)
  local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '')
  local taken = redis.call('HGET', KEYS[1], 'k_taken')
  if seq and taken then
    seq = math.max(seq, tonumber(redis.call('GET', taken) or '0'))
  end
  requeue(seq, channel)
end
