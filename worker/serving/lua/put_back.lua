#!lua flags=allow-oom
-- Put a message taken off its queue back at its head (worker/serving/transport.py). Allowed while Redis is
-- out of memory (the flag above, Redis 7; it must be the first line): it takes back what taking the
-- message off the queue freed.
-- KEYS: the queue. ARGV: the message. Returns 1.

redis.call('RPUSH', KEYS[1], ARGV[1])
return 1
