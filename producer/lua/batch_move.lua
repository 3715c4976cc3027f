-- Fragment: a job leaving a state, for its queue and its batch.
--   stop_waiting(): the job leaves its queue's waiting set (named in its record: 'k_waiting'); it does when
--     it starts or ends.
--   batch_move(from, to): a batch job's record names its batch ('batch'); one count there moves from 'from' to
--     'to', so that the batch's counts are always those of its jobs, and a batch whose last job ended is
--     completed (events.lua). Returns the batch's key, or nil: no batch, or it has expired (it is not recreated).
--     A 'running' job is counted 'held' until its holder begins generating it (the record's 'generating' is ''
--     from its start, then names that holder: generating.lua).
-- KEYS[1]: the job's record. ARGV: none of its own.
-- include: record
-- include: events

local function stop_waiting()
  local waiting = rec('k_waiting')
  if waiting then
    redis.call('ZREM', waiting, job_id_of_record())
  end
end

-- A running job not generating yet: START marks it so ('generating' is ''), generating.lua names its holder there
-- when it begins, a requeue deletes it. (A record started before the field was kept has none: running.)
local function held()
  return rec('generating') == ''
end

local function batch_move(from, to)
  local batch = rec('batch')
  if not batch or redis.call('EXISTS', batch) == 0 then
    return nil
  end
  if from == 'running' and held() then
    from = 'held'
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
