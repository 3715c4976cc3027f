-- Fragment: a running job back to queued, its message back on its queue.
--   requeue(seq): the record queued again, numbered 'seq' (when given) in its queue's waiting set,
--     so that the sweeper finds it should its message be lost again (worker/serving/sweeper.py); its batch's
--     counts moved back.
--   requeue_at_head(): the same, numbered as the latest started on its queue (its message went back
--     to the head of the queue).
-- KEYS[1]: the job's record. ARGV: none of its own.
-- include: batch_move

local function requeue(seq)
  batch_move('running', 'queued')
  local waiting = rec('k_waiting')
  if waiting and seq then
    rec_set('state', 'queued', 'seq', seq)
    redis.call('ZADD', waiting, seq, job_id_of_record())
  else
    rec_set('state', 'queued')
  end
  rec_del('started_at', 'worker', 'holder', 'generating')
end

local function requeue_at_head()
  local seq = tonumber(rec('seq') or '')
  local taken = rec('k_taken')
  if seq and taken then
    seq = math.max(seq, tonumber(redis.call('GET', taken) or '0'))
  end
  requeue(seq)
end
