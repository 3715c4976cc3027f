-- Enqueue a job (producer/enqueue.py): its record and its Celery message, and for a batch job its place in
-- the batch, all or nothing. The record keeps the names of its queue's keys, for the scripts that move it
-- on, and its number on its queue, by which a worker finds a lost message (worker/serving/sweeper.py).
-- KEYS: the job's record, its queue, its batch's hash and its batch's job list (the record's key, unused,
--   when none), the queue's sequence counter, the queue's waiting set.
-- ARGV: request JSON, now, pending ttl, message envelope, job id, batch key ('' when none), batch id,
--   custom id, line, queue name, the queue's taken-mark key, the error JSON of a job whose batch was
--   cancelled, for a queue shared fairly (producer/fairness.py; '' otherwise) its tenants list, the job's
--   tenant's list and its line, and the queue's depth, then field, value pairs the record also holds (its
--   tenant, its webhook).
-- Returns 'created', 'exists' (the same request: nothing done), 'conflict' (another request under that
-- id) or 'cancelled' (its batch was cancelled while being submitted: the record ends cancelled, no message
-- is sent).
-- include: fair_feed
-- include: stats

local existing = redis.call('HGET', KEYS[1], 'request')
if existing then
  if existing == ARGV[1] then return 'exists' end
  return 'conflict'
end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[3], 'state') == 'cancelled' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'created_at', ARGV[2], 'finished_at', ARGV[2], 'attempts', 0, 'request', ARGV[1],
             'error', ARGV[12], 'job_id', ARGV[5], 'batch', ARGV[6], 'batch_id', ARGV[7], 'custom_id', ARGV[8], 'line', ARGV[9])
  for i = 17, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('HINCRBY', KEYS[3], 'cancelled', 1)
  redis.call('RPUSH', KEYS[4], ARGV[5])
  count_ended('cancelled', 'error', ARGV[12])
  return 'cancelled'
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'created_at', ARGV[2], 'attempts', 0, 'request', ARGV[1])
for i = 17, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'batch', ARGV[6], 'batch_id', ARGV[7], 'custom_id', ARGV[8], 'line', ARGV[9])
  redis.call('HINCRBY', KEYS[3], 'queued', 1)
  redis.call('RPUSH', KEYS[4], ARGV[5])
end
redis.call('HSET', KEYS[1], 'job_id', ARGV[5], 'queue', ARGV[10], 'k_sequence', KEYS[5], 'k_waiting', KEYS[6], 'k_taken', ARGV[11])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local depth = tonumber(ARGV[16]) or 0
if ARGV[13] ~= '' then
  redis.call('HSET', KEYS[1], 'k_fair', ARGV[13])
  if redis.call('EXISTS', ARGV[13]) == 1 or redis.call('LLEN', KEYS[2]) >= depth then
    wait_in_line(ARGV[13], ARGV[14], ARGV[15], ARGV[5], ARGV[4])
    feed(KEYS[2], ARGV[13], depth, KEYS[5], KEYS[6])
    return 'created'
  end
end
local seq = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[1], 'seq', seq)
redis.call('ZADD', KEYS[6], seq, ARGV[5])
redis.call('LPUSH', KEYS[2], ARGV[4])
return 'created'
