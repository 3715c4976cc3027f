-- Open a batch (producer/batches.py): its hash is created unless it exists (a resubmission resumes it).
-- KEYS: the batch's hash. ARGV: ttl, then field, value pairs.
-- Returns {state ('new' when created), deadline, digest}.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {redis.call('HGET', KEYS[1], 'state') or '', redis.call('HGET', KEYS[1], 'deadline') or '', redis.call('HGET', KEYS[1], 'digest') or ''}
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {'new', '', ''}
