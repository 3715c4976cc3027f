-- Start a delivered job on this worker (worker/serving/handler.py): its record goes to running, held by this
-- worker process, unless the job has ended, its request differs, it runs on another live worker (or on this
-- one), its cancellation was requested, or it has used up its attempts or deliveries. A message without a
-- record (its record expired, or it was never written) makes one. The attempts are counted when the job
-- starts generating (generating.lua), not here: a job a worker held when it died, but had not started, is
-- not charged for it.
-- KEYS: the job's record, its chunks stream. (Its queue's waiting set and taken mark are named in the record.)
-- ARGV: worker (node name), now, pending ttl, request JSON (canonical), the job's channel, max attempts,
--   job id, liveness key prefix, this worker process's incarnation (its liveness key's suffix), '1' to take
--   over a job this process's record says it holds but does not (its first start's reply was lost, the call
--   retried), the depth of a fairly shared queue (producer/fairness.py).
-- Returns {outcome, attempts, created_at}; outcome: 'run', 'final:<state>', 'mismatch', 'held' (running on
-- another live worker), 'held_here' (running on this one), 'cancel' (its cancellation was requested while
-- an earlier attempt ran), 'exhausted', 'undeliverable'.
-- include: batch_move
-- include: fair_feed

local state = redis.call('HGET', KEYS[1], 'state')
feed_after(KEYS[1], tonumber(ARGV[11]))  -- its message left its queue: the next from the lines takes its place
if state and FINAL[state] then
  stop_waiting()
  return {'final:' .. state, tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0'), ''}
end
if state then
  if redis.call('HGET', KEYS[1], 'request') ~= ARGV[4] then
    return {'mismatch', 0, ''}
  end
  -- Running on a worker that is alive (announced): this is not a redelivery after its death.
  if state == 'running' then
    local holder = redis.call('HGET', KEYS[1], 'holder')
    if holder == ARGV[9] then
      if ARGV[10] ~= '1' then
        return {'held_here', 0, ''}
      end
    elseif holder and redis.call('EXISTS', ARGV[8] .. holder) == 1 then
      return {'held', 0, ''}
    end
  end
else
  redis.call('HSET', KEYS[1], 'created_at', ARGV[2], 'request', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
local done = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if redis.call('HEXISTS', KEYS[1], 'cancel_requested_at') == 1 then
  return {'cancel', done, ''}
end
if done >= tonumber(ARGV[6]) then
  return {'exhausted', done, ''}
end
-- A backstop for a job whose worker dies before it starts generating (so no attempt is counted).
if redis.call('HINCRBY', KEYS[1], 'deliveries', 1) > 3 * tonumber(ARGV[6]) then
  return {'undeliverable', done, ''}
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '')
if seq and state == 'queued' then
  stop_waiting()
  local taken = redis.call('HGET', KEYS[1], 'k_taken')  -- (absent from a record enqueued before it was kept)
  if taken and seq > tonumber(redis.call('GET', taken) or '0') then
    redis.call('SET', taken, seq)
  end
end
local batch = batch_move(state, 'held')
if batch then
  redis.call('HSETNX', batch, 'first_started_at', ARGV[2])
end
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[2], 'worker', ARGV[1], 'holder', ARGV[9])
redis.call('HSET', KEYS[1], 'generating', '')  -- (held, until this holder begins generating it)
redis.call('DEL', KEYS[2])  -- chunks of an earlier attempt: this one streams from the start
redis.call('PUBLISH', ARGV[5], cjson.encode({event='state', state='running', attempts=done}))
webhook_event(KEYS[1], 'job', ARGV[7], 'start')
return {'run', done, redis.call('HGET', KEYS[1], 'created_at')}
