-- The sweeper's resend of a job whose message was lost (worker/serving/sweeper.py): only if the job still
-- waits, behind a started job or on an empty queue (checked by the caller), and was not resent within the gap.
-- KEYS: the job's record, its queue. ARGV: the message, now, least seconds between two resends.
-- Returns 1 if sent, 0 if not.

if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then
  return 0
end
local waiting = redis.call('HGET', KEYS[1], 'k_waiting')
if not waiting or not redis.call('ZSCORE', waiting, redis.call('HGET', KEYS[1], 'job_id')) then
  return 0
end
local last = tonumber(redis.call('HGET', KEYS[1], 'resent_at') or '0')
if tonumber(ARGV[2]) - last < tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], 'resent_at', ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
