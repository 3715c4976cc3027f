-- Start a delivered job on this worker (worker/serving/handler.py): its record goes to running, held by this
-- worker process, unless the job has ended, its request differs, it runs on another live worker (or on this
-- one), its cancellation was requested, or it has used up its attempts or deliveries. The producer's messages
-- carry no request (ARGV[4] is ''): the record's is returned; one without a record cannot run ('missing'). A
-- message that carries its request (one of an earlier version) and has no record (its record expired, or it
-- was never written) makes one. The attempts are counted when the job
-- starts generating (generating.lua), not here: a job a worker held when it died, but had not started, is
-- not charged for it.
-- KEYS: the job's record, its chunks stream. (Its queue's waiting set and taken mark are named in the record.)
-- ARGV: worker (node name), now, pending ttl, the message's request JSON (canonical; '' when it carries none),
--   (unused), max attempts, job id, liveness key prefix, this worker process's incarnation (its liveness key's
--   suffix), '1' to take over a job this process's record says it holds but does not (its first start's reply
--   was lost, the call retried), the depth of a fairly shared queue (producer/fairness.py), the message's
--   request in its stored form (producer/schemas.py, ``stored_form``; '' when none).
-- Returns {outcome, attempts, created_at, request}; outcome: 'run', 'final:<state>', 'mismatch', 'held' (running
-- on another live worker), 'held_here' (running on this one), 'cancel' (its cancellation was requested while
-- an earlier attempt ran), 'exhausted', 'undeliverable', 'missing' (no record, no request); request: the
-- record's (stored form), when the message carries none.
-- include: batch_move
-- include: fair_feed

local state = rec('state')
feed_after(tonumber(ARGV[11]))  -- its message left its queue: the next from the lines takes its place
if state and FINAL[state] then
  stop_waiting()
  return {'final:' .. state, tonumber(rec('attempts') or '0'), ''}
end
if state then
  if ARGV[4] ~= '' and rec('request') ~= ARGV[4] and rec('request') ~= ARGV[12] then
    return {'mismatch', 0, ''}
  end
  -- Running on a worker that is alive (announced): this is not a redelivery after its death.
  if state == 'running' then
    local holder = rec('holder')
    if holder == ARGV[9] then
      if ARGV[10] ~= '1' then
        return {'held_here', 0, ''}
      end
    elseif holder and redis.call('EXISTS', ARGV[8] .. holder) == 1 then
      return {'held', 0, ''}
    end
  end
elseif ARGV[4] == '' then
  return {'missing', 0, ''}
else
  rec_set('created_at', ARGV[2], 'request', ARGV[12])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
local done = tonumber(rec('attempts') or '0')
if rec('cancel_requested_at') then
  return {'cancel', done, ''}
end
if done >= tonumber(ARGV[6]) then
  return {'exhausted', done, ''}
end
-- A backstop for a job whose worker dies before it starts generating (so no attempt is counted).
local deliveries = tonumber(rec('deliveries') or '0') + 1
if deliveries > 3 * tonumber(ARGV[6]) then
  rec_set('deliveries', deliveries)
  return {'undeliverable', done, ''}
end
local seq = tonumber(rec('seq') or '')
if seq and state == 'queued' then
  stop_waiting()
  local taken = rec('k_taken')  -- (absent from a record enqueued before it was kept)
  if taken and seq > tonumber(redis.call('GET', taken) or '0') then
    redis.call('SET', taken, seq)
  end
end
local batch = batch_move(state, 'held')
if batch then
  redis.call('HSETNX', batch, 'first_started_at', ARGV[2])
end
-- 'generating' is '' (held) until this holder begins generating it.
rec_set('state', 'running', 'started_at', ARGV[2], 'worker', ARGV[1], 'holder', ARGV[9], 'generating', '', 'deliveries', deliveries)
if done > 0 or deliveries > 1 then
  redis.call('DEL', KEYS[2])  -- chunks of an earlier attempt: this one streams from the start
end
webhook_event(KEYS[1], 'job', ARGV[7], 'start')
return {'run', done, rec('created_at') or '', ARGV[4] == '' and rec('request') or ''}  -- (a nil would cut the reply short)
