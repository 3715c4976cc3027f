-- Enqueue a job (producer/enqueue.py): its record and its Celery message, and for a batch job its place in
-- the batch, all or nothing. The record keeps its queue's name (the scripts that move it on make the names
-- of the queue's keys from it: record.lua), and its number on its queue, by which a worker finds a lost
-- message (worker/serving/sweeper.py). A job waiting in a fair-share line holds its id there, not its
-- message (made as it goes on the queue).
-- KEYS: the job's record, its queue, its batch's hash and its batch's job list (the record's key, unused,
--   when none), the queue's sequence counter, the queue's waiting set.
-- ARGV: request JSON (its stored form), now, pending ttl, message envelope, job id, batch key ('' when none), batch id,
--   custom id, line, queue name, the request JSON with every field explicit (as an earlier version stored it: the
--   same request then), the error JSON of a job whose batch was
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
  if existing == ARGV[1] or existing == ARGV[11] then return 'exists' end
  return 'conflict'
end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[3], 'state') == 'cancelled' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'created_at', ARGV[2], 'finished_at', ARGV[2], 'attempts', 0, 'request', ARGV[1],
             'error', ARGV[12], 'batch_id', ARGV[7], 'custom_id', ARGV[8], 'line', ARGV[9])
  for i = 17, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('HINCRBY', KEYS[3], 'cancelled', 1)
  redis.call('RPUSH', KEYS[4], ARGV[5])
  count_ended('cancelled', 'error', ARGV[12])
  return 'cancelled'
end
-- The record, written with one HSET once its number on the queue is known; the keys of its queue and its batch
-- are made from their names when needed (record.lua).
local fields = {'state', 'queued', 'created_at', ARGV[2], 'request', ARGV[1], 'queue', ARGV[10]}
for i = 17, #ARGV do fields[#fields + 1] = ARGV[i] end
if ARGV[6] ~= '' then
  for _, v in ipairs({'batch_id', ARGV[7], 'line', ARGV[9]}) do fields[#fields + 1] = v end
  if ARGV[8] ~= '' then  -- ('' when it is the line's default: producer/records.py, default_custom_id)
    fields[#fields + 1] = 'custom_id'
    fields[#fields + 1] = ARGV[8]
  end
  redis.call('HINCRBY', KEYS[3], 'queued', 1)
  redis.call('RPUSH', KEYS[4], ARGV[5])
end
local depth = tonumber(ARGV[16]) or 0
if ARGV[13] ~= '' then
  if redis.call('EXISTS', ARGV[13]) == 1 or redis.call('LLEN', KEYS[2]) >= depth then
    redis.call('HSET', KEYS[1], unpack(fields))
    redis.call('EXPIRE', KEYS[1], ARGV[3])
    wait_in_line(ARGV[13], ARGV[14], ARGV[15], ARGV[5])
    feed(KEYS[2], ARGV[13], depth, KEYS[5], KEYS[6])
    return 'created'
  end
end
local seq = redis.call('INCR', KEYS[5])
fields[#fields + 1] = 'seq'
fields[#fields + 1] = seq
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[6], seq, ARGV[5])
redis.call('LPUSH', KEYS[2], ARGV[4])
return 'created'
