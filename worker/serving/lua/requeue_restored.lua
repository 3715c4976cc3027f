-- After kombu itself sent a message back to its queue (its visibility timeout passed, worker/serving/transport.py):
-- the job's record goes back to queued too, when it is still running under the message's holder and that
-- holder is dead, so that the lost-message sweep covers the job should its message be lost once more
-- (taken by a worker that dies before recording it). A live holder's job is left alone (it runs, or its
-- own release puts it back), and so is a job another worker has started meanwhile.
-- KEYS: the job's record.
-- ARGV: the message's holder (a worker process's incarnation), that holder's liveness key.
-- Returns 1 when the record went back to queued, else 0.
-- include: requeue

if redis.call('EXISTS', ARGV[2]) == 1 then
  return 0
end
if rec('state') ~= 'running' or rec('holder') ~= ARGV[1] then
  return 0
end
requeue_at_head()
return 1
