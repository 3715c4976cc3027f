-- A batch whose lines are all in: submitted (unless it was cancelled meanwhile), with its 'start' webhook
-- event; completed at once if every job has already ended.
-- KEYS: the batch's hash. ARGV: now. Returns 1.
-- include: events

if redis.call('HGET', KEYS[1], 'state') == 'submitting' then
  redis.call('HSET', KEYS[1], 'state', 'submitted', 'submitted_at', ARGV[1])
  webhook_event(KEYS[1], 'batch', redis.call('HGET', KEYS[1], 'batch_id') or '', 'start')
  batch_completed(KEYS[1])
end
return 1
