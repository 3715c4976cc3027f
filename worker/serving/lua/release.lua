-- Give back a job this worker process took but did not start (the worker is stopping): queued again (it
-- was never charged an attempt, and this delivery is not counted), unless it has ended or another worker
-- took it. Its message goes back to the far end of its queue: it waits there, numbered as the last.
-- KEYS: the job's record. ARGV: holder (this worker process's incarnation).
-- Returns 1 if released, 0 when the record is no longer this process's running job.
-- include: requeue

if rec('state') ~= 'running' or rec('holder') ~= ARGV[1] then
  return 0
end
rec_set('deliveries', tonumber(rec('deliveries') or '0') - 1)
local sequence = rec('k_sequence')
requeue(sequence and redis.call('INCR', sequence))
return 1
