-- Fragment: a job leaving a state, for its queue and its batch.
--   stop_waiting(): the job leaves its queue's waiting set (named in its record: 'k_waiting'); it does when
--     it starts or ends.
--   batch_move(from, to): a batch job's record names its batch ('batch'); one count there moves from 'from' to
--     'to', so that the batch's counts are always those of its jobs, and a batch whose last job ended is
--     completed (events.lua). Returns the batch's key, or nil: no batch, or it has expired (it is not recreated).
--     A 'running' job is counted 'held' until its holder begins generating it (the record's 'generating' is ''
--     from its start, then names that holder: generating.lua).
-- KEYS[1]: the job's record. ARGV: none of its own.
-- include: events

local function stop_waiting()
  local waiting = redis.call('HGET', KEYS[1], 'k_waiting')
  if waiting then
    redis.call('ZREM', waiting, redis.call('HGET', KEYS[1], 'job_id') or '')
  end
end

local function batch_move(from, to)
  local batch = redis.call('HGET', KEYS[1], 'batch')
  if not batch or redis.call('EXISTS', batch) == 0 then
    return nil
  end
  if from == 'running' then
    local generating = redis.call('HGET', KEYS[1], 'generating')  -- (absent from a record started before it was kept: running)
    if generating and generating ~= redis.call('HGET', KEYS[1], 'holder') then
      from = 'held'
    end
  end
  if from and from ~= to then
    redis.call('HINCRBY', batch, from, -1)
    redis.call('HINCRBY', batch, to, 1)
    if to ~= 'queued' and to ~= 'held' and to ~= 'running' then
      batch_completed(batch)
    end
  end
  return batch
end
