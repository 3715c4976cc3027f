-- The sweeper's resend of a job whose message was lost (worker/serving/sweeper.py): only if the job still
-- waits, behind a started job or on an empty queue (checked by the caller), and was not resent within the gap.
-- KEYS: the job's record, its queue. ARGV: the message, now, least seconds between two resends.
-- Returns 1 if sent, 0 if not.

-- include: record

if rec('state') ~= 'queued' then
  return 0
end
local waiting = rec('k_waiting')
if not waiting or not redis.call('ZSCORE', waiting, job_id_of_record()) then
  return 0
end
local last = tonumber(rec('resent_at') or '0')
if tonumber(ARGV[2]) - last < tonumber(ARGV[3]) then
  return 0
end
rec_set('resent_at', ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
