-- A running job that this worker process starts to generate: one more attempt (attempts count the times a
-- worker began generating a job, not the times it held it), and the first time this process does, its batch
-- counts it running instead of held. Nothing if the job is not this process's.
-- KEYS: the job's record. ARGV: holder (this worker process's incarnation).
-- Returns the attempts now, or 0 when nothing was counted.
-- include: batch_move

if redis.call('HGET', KEYS[1], 'state') == 'running' and redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then
  if held() then
    batch_move('held', 'running')
  end
  redis.call('HSET', KEYS[1], 'generating', ARGV[1])
  return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
end
return 0
