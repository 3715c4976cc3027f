-- Feed a queue from its fair-share lines now (producer/lua/fair_feed.lua): what enqueuing and starting jobs
-- do as they go, run by a worker's sweeper in case nothing else comes along.
-- KEYS: the queue, its tenants list, its sequence counter, its waiting set. ARGV: the queue's depth.
-- Returns how many jobs went on the queue.
-- include: fair_feed

return feed(KEYS[1], KEYS[2], tonumber(ARGV[1]), KEYS[3], KEYS[4])
