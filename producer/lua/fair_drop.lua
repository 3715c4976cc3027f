-- Take a batch's line out of its queue's fair-share lines (producer/fairness.py, producer/lua/fair_feed.lua):
-- its jobs waiting there never go on the queue (the batch is being cancelled; their records end cancelled).
-- KEYS: the queue's tenants list, the batch's tenant's list, the batch's line. ARGV: none.
-- Returns how many jobs the line held.

local held = redis.call('LLEN', KEYS[3])
redis.call('DEL', KEYS[3])
if redis.call('LREM', KEYS[2], 0, KEYS[3]) > 0 and redis.call('LLEN', KEYS[2]) == 0 then
  redis.call('LREM', KEYS[1], 0, KEYS[2])
end
return held
