-- Send back one message held by a dead worker process (worker/serving/unacked.py), once: only if its
-- holder is still dead and still the message's holder, and the unacked entry is the one read. A job the
-- dead holder had started goes back to queued with its message, numbered as the latest started on its
-- queue (its message is at the head), so that the sweeper sends its message again should it be lost once
-- more (taken by a worker that dies before recording it).
-- KEYS: the job's record, kombu's unacked hash, kombu's unacked index, the queue. (The delivery tag names its
--   holder: worker/serving/unacked.py.)
-- ARGV: delivery tag, the dead holder, its liveness key, the unacked entry as read, the message to put back.
-- Returns 'alive', 'gone' (no longer that holder's: acknowledged, or sent back by another sweeper or by
-- kombu) or 'sent'.
-- include: requeue

if redis.call('EXISTS', ARGV[3]) == 1 then
  return 'alive'
end
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[4] then
  return 'gone'
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[4], ARGV[5])
if rec('state') == 'running' and rec('holder') == ARGV[2] then
  requeue_at_head()
end
return 'sent'
