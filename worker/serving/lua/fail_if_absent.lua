-- A job a worker could not even read the message of: failed, if it has no record; an existing record (maybe
-- another job's, named by a forged message) is left alone.
-- KEYS: the job's record. ARGV: now, ttl, error JSON, the job's channel, end event JSON, stand-in request JSON.
-- Returns 1 if it wrote, 0 if not.
-- include: stats

if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'failed', 'created_at', ARGV[1], 'finished_at', ARGV[1], 'attempts', 0, 'request', ARGV[6], 'error', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
count_ended('failed', 'error', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
