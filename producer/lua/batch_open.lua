-- Open a batch (producer/batches.py): its hash is created unless it exists (a resubmission resumes it), and
-- entered in the open batches (keys.OPEN_BATCHES, by its 'created_at'; the fleet metrics read them), where
-- entries older than the ttl whose hash has expired are dropped.
-- KEYS: the batch's hash. ARGV: ttl, then field, value pairs (with 'created_at').
-- Returns {state ('new' when created), deadline, digest}.
-- include: constants

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {redis.call('HGET', KEYS[1], 'state') or '', redis.call('HGET', KEYS[1], 'deadline') or '', redis.call('HGET', KEYS[1], 'digest') or ''}
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
local created = tonumber(redis.call('HGET', KEYS[1], 'created_at')) or 0
redis.call('ZADD', OPEN_BATCHES, created, KEYS[1])
for _, batch in ipairs(redis.call('ZRANGEBYSCORE', OPEN_BATCHES, '-inf', created - tonumber(ARGV[1]), 'LIMIT', 0, 100)) do
  if redis.call('EXISTS', batch) == 0 then
    redis.call('ZREM', OPEN_BATCHES, batch)
  end
end
return {'new', '', ''}
