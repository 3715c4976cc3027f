#!lua flags=allow-oom
-- A worker's heartbeat while Redis refuses writes (worker/serving/announce.py): its announcement rewritten
-- in place and its liveness key renewed (when healthy), allowed while Redis is out of memory (the flag
-- above, Redis 7; it must be the first line).
-- KEYS: the announcement, the liveness key. ARGV: announcement JSON, '1' when healthy, expiry (s). Returns 1.

redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
if ARGV[2] == '1' then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
end
return 1
