-- Send back one message that Redis says a live worker process holds, though that process no longer handles
-- it: what it wrote after taking it (the job's final state, the acknowledgement) was lost with a primary
-- that failed over, or in a Redis crash (worker/serving/unacked.py). Only if that process is still the
-- message's holder and the unacked entry is the one read. A job it had started goes back to queued, its
-- message at the head of its queue; a job that has ended needs no message: the entry is dropped; a job
-- running on another holder is left to it.
-- KEYS: the job's record, kombu's unacked hash, kombu's unacked index, the queue. (The delivery tag names its
--   holder: worker/serving/unacked.py.)
-- ARGV: delivery tag, the holder, the unacked entry as read, the message to put back.
-- Returns 'gone' (no longer that holder's), 'dropped', 'left' or 'sent'.
-- include: requeue

if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[3] then
  return 'gone'
end
local state = rec('state')
local ours = state == 'running' and rec('holder') == ARGV[2]
if state == 'running' and not ours then
  return 'left'
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if state and state ~= 'queued' and state ~= 'running' then
  return 'dropped'
end
redis.call('RPUSH', KEYS[4], ARGV[4])
if ours then
  requeue_at_head()
end
return 'sent'
