"""Messages held by worker processes, and sending back those of a process that died.

kombu records a message in hand in its ``unacked`` hash and sends it back to its queue only after the
visibility timeout (an hour by default), whoever held it: a job whose worker died would wait that
long. So every worker process also records the messages it holds in its own held set
(``keys.held(incarnation)``, worker/transport.py) and lists itself in ``keys.HOLDERS``. A process is
dead once its liveness key (``keys.worker_alive``, renewed every 2 s by its announcer, gone 6 s after
its last renewal) is gone; ``reclaim_dead`` then sends each of its messages back to the head of its
queue, in one script per message that checks again that the holder is dead and that the message is
still in its set, and takes it out of both: so a message goes back once, by one worker, and never
while its holder lives. What follows is what follows any redelivery (producer/store.py,
START_SCRIPT): the job runs again, its attempts counted as before.
"""

from __future__ import annotations

import json
import logging

import redis

from producer import keys

log = logging.getLogger("belle.held")

# kombu's Redis transport's record of the messages workers hold: by delivery tag, and by time taken.
UNACKED_INDEX = "unacked_index"

# KEYS: held set, unacked hash, unacked index, queue. ARGV: delivery tag, the holder's liveness key,
# the unacked entry as read, the message to put back. Returns 'alive', 'gone' (another sweeper sent it
# back, or it was acknowledged), 'changed' (the entry is no longer that message) or 'sent'.
RECLAIM_SCRIPT = """
if redis.call('EXISTS', ARGV[2]) == 1 then
  return 'alive'
end
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then
  return 'gone'
end
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[3] then
  return 'changed'
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[4], ARGV[4])
return 'sent'
"""

# KEYS: held set, holders. ARGV: incarnation, its liveness key. A dead holder holding nothing more is forgotten.
FORGET_SCRIPT = """
if redis.call('EXISTS', ARGV[2]) == 0 and redis.call('SCARD', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


class HeldMessages:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._reclaim = client.register_script(RECLAIM_SCRIPT)
        self._forget = client.register_script(FORGET_SCRIPT)

    def reclaim_dead(self) -> dict[str, int]:
        """Send back the messages of every dead holder; returns how many per holder."""
        holders = sorted(self.redis.smembers(keys.HOLDERS))
        if not holders:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for incarnation in holders:
            pipe.exists(keys.worker_alive(incarnation))
        sent = {}
        for incarnation, alive in zip(holders, pipe.execute(), strict=True):
            if not alive:
                sent[incarnation] = self._reclaim_holder(incarnation)
        return {incarnation: n for incarnation, n in sent.items() if n}

    def _reclaim_holder(self, incarnation: str) -> int:
        held, alive = keys.held(incarnation), keys.worker_alive(incarnation)
        tags = sorted(self.redis.smembers(held))
        entries = self.redis.hmget(keys.UNACKED, tags) if tags else []
        pipe = self.redis.pipeline(transaction=False)
        for tag, entry in zip(tags, entries, strict=True):
            message, queue = _returned(entry)
            if message is None:  # acknowledged meanwhile, or not a message this can put back: the visibility timeout will
                pipe.srem(held, tag)
                continue
            self._reclaim(keys=[held, keys.UNACKED, UNACKED_INDEX, queue], args=[tag, alive, entry, message], client=pipe)
        sent = sum(outcome == "sent" for outcome in pipe.execute())
        self._forget(keys=[held, keys.HOLDERS], args=[incarnation, alive])
        if sent:
            log.warning("worker process %s is dead: %d messages it held went back to their queues", incarnation, sent)
        return sent


def _returned(entry: str | None) -> tuple[str | None, str]:
    """The message of an unacked entry as kombu would put it back (marked redelivered), and its queue;
    (None, '') for an entry that is not one this can put back (a named exchange, a priority queue)."""
    if entry is None:
        return None, ""
    try:
        message, exchange, routing_key = json.loads(entry)
        if exchange or not isinstance(routing_key, str) or (message.get("properties") or {}).get("priority") not in (None, 0):
            return None, ""
        message["headers"]["redelivered"] = True
        message["properties"]["delivery_info"]["redelivered"] = True
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, ""
    return json.dumps(message), routing_key
