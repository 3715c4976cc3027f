"""Messages held by worker processes, and sending back those of a process that died.

kombu records a message in hand in its ``unacked`` hash and sends it back to its queue only after the
visibility timeout (an hour by default), whoever held it: a job whose worker died would wait that
long. So the delivery tag a worker process gives each message it takes (the key of kombu's records of
it) names that process, its holder (``new_delivery_tag``, ``holder_of``: worker/serving/transport.py),
and the process lists itself in ``keys.HOLDERS`` (worker/serving/announce.py). A process is dead once its liveness key (``keys.worker_alive``, renewed
every 2 s by its announcer, gone 6 s after its last renewal) is gone, and still gone a look at least
3 s later, with Redis up for longer than a liveness key lives (after a Redis restart every key has
lapsed, live workers' too, until their next beat); ``reclaim_dead`` then sends each message still
recorded as its own back to the head of its queue, in one script per message that
checks again that the holder is dead and still the message's holder, and takes the message out of
both records: so a message goes back once, by one worker, and never while its holder lives (a
message that kombu already sent back and another process took is that process's now). The job's
record goes back to queued in the same script (numbered on its queue, so that the lost-message sweep
covers it should its message be lost again). What follows is what follows any redelivery
(worker/serving/lua/start.lua): the job runs again, its attempts counted as before.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable

import redis

from producer import keys
from producer.fleet import EXPIRES_S, HEARTBEAT_S
from worker.serving.intake import named_job
from worker.serving.lua import script

log = logging.getLogger("belle.held")

# kombu's Redis transport's index of the messages workers hold, by the time they were taken.
UNACKED_INDEX = "unacked_index"
SCAN_COUNT = 1_000
CONFIRM_AFTER_S = 1.5 * HEARTBEAT_S  # a live worker renews its key within this of any look
_HOLDER_AFTER = "."  # a delivery tag is 32 hex digits, this, and its holder (a process's incarnation)
# Delivery tag → holder, as workers of earlier versions recorded the messages they held (their tags do not name
# them): read, so that their messages still go back soon after they die during a rolling upgrade; never written.
LEGACY_HOLDER_OF = f"{keys.PREFIX}:holder-of"


def new_delivery_tag(holder: str | None) -> str:
    """A fresh delivery tag for a message a worker process takes, naming that process (when it has an incarnation)."""
    tag = uuid.uuid4().hex
    return f"{tag}{_HOLDER_AFTER}{holder}" if holder else tag


def holder_of(tag: str) -> str | None:
    """The worker process a delivery tag names (``new_delivery_tag``), or None."""
    if isinstance(tag, bytes):
        tag = tag.decode("utf-8", "replace")
    return tag[33:] if len(tag) > 33 and tag[32] == _HOLDER_AFTER else None


def held_by(client: redis.Redis, holders: set[str]) -> dict[str, list[tuple[str, float]]]:
    """The messages Redis records as held by each of ``holders``: (delivery tag, when it was taken) from kombu's index."""
    held: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for tag, taken in client.zscan_iter(UNACKED_INDEX, count=SCAN_COUNT):
        if (holder := holder_of(tag)) in holders:
            held[holder].append((tag, taken))
    return held

class HeldMessages:
    def __init__(self, client: redis.Redis, *, confirm_after_s: float = CONFIRM_AFTER_S):
        self.redis = client
        self.confirm_after_s = confirm_after_s
        self._reclaim = client.register_script(script("reclaim"))
        self._stranded = client.register_script(script("reclaim_stranded"))
        self._suspects: dict[str, float] = {}  # holder → when its liveness key was first seen gone (monotonic)

    def dead_holders(self) -> list[str]:
        """Holders whose liveness key is gone, and was gone at a look ``confirm_after_s`` before."""
        holders = sorted(self.redis.smembers(keys.HOLDERS))
        pipe = self.redis.pipeline(transaction=False)
        for incarnation in holders:
            pipe.exists(keys.worker_alive(incarnation))
        now = time.monotonic()
        self._suspects = {incarnation: self._suspects.get(incarnation, now)
                          for incarnation, alive in zip(holders, pipe.execute() if holders else [], strict=True) if not alive}
        dead = [incarnation for incarnation, since in self._suspects.items() if now - since >= self.confirm_after_s]
        if dead and int(self.redis.info("server")["uptime_in_seconds"]) <= EXPIRES_S:
            return []  # Redis has just (re)started: every liveness key lapsed meanwhile, and live workers have yet to renew theirs
        return dead

    def reclaim_dead(self) -> dict[str, int]:
        """Send back the messages of every dead holder; returns how many per holder (those that had any)."""
        dead = set(self.dead_holders())
        if not dead:
            return {}
        held = held_by(self.redis, dead)
        legacy = [(tag, holder) for tag, holder in self.redis.hscan_iter(LEGACY_HOLDER_OF, count=SCAN_COUNT) if holder in dead]
        for tag, holder in legacy:
            held[holder].append((tag, 0.0))
        outcomes = {incarnation: self._reclaim_holder(incarnation, [tag for tag, _ in held[incarnation]]) for incarnation in dead}
        # A dead holder that holds nothing more is forgotten (a process that comes back has a new incarnation).
        done = [incarnation for incarnation in dead if outcomes[incarnation].total() == outcomes[incarnation]["sent"] + outcomes[incarnation]["gone"]]
        if done:
            self.redis.srem(keys.HOLDERS, *done)
            if finished := [tag for tag, holder in legacy if holder in done]:
                self.redis.hdel(LEGACY_HOLDER_OF, *finished)
        return {incarnation: counts["sent"] for incarnation, counts in outcomes.items() if counts["sent"]}

    def _reclaim_holder(self, incarnation: str, tags: list[str]) -> Counter:
        """How many of its messages went back ('sent'), were no longer its own ('gone'), or were left
        (its holder is alive after all, or kombu puts them back: anything else)."""
        if not tags:
            return Counter()
        alive = keys.worker_alive(incarnation)
        entries = self.redis.hmget(keys.UNACKED, tags)
        pipe = self.redis.pipeline(transaction=False)
        for tag, entry in zip(tags, entries, strict=True):
            message, queue, job_id = _returned(entry)
            if entry is not None and message is None:  # not a message this can put back: kombu's visibility timeout will
                pipe.echo("left")
                continue
            # (An entry acknowledged meanwhile: the script only clears the holder's record of it, if still there.)
            record = keys.job(job_id) if job_id else keys.job("-")  # (no job named: no record is touched)
            self._reclaim(keys=[record, keys.UNACKED, UNACKED_INDEX, queue or keys.QUEUE_INTERACTIVE],
                          args=[tag, incarnation, alive, entry or "", message or ""], client=pipe)
        outcomes = Counter(pipe.execute())
        if outcomes["sent"]:
            log.warning("worker process %s is dead: %d messages it held went back to their queues", incarnation, outcomes["sent"])
        return outcomes


    def reclaim_stranded(self, incarnation: str, in_hand: Callable[[], set[str]], tags_in_hand: Callable[[], set[str]], *,
                         taken_before: float) -> Counter:
        """Send back the messages Redis records as held by ``incarnation`` (this live process) that it took
        before ``taken_before`` (time.time()) and no longer holds: neither their delivery tags (``tags_in_hand()``:
        taken, not yet acknowledged, rejected or sent back) nor their jobs (``in_hand()``: being handled). After
        the primary changed (a failover, a Redis crash), what the process wrote last may be gone, its final states
        and acknowledgements with it. Their jobs run again now, rather than after the visibility timeout. (What
        this process holds is read after Redis's records: a message taken meanwhile is in it.)"""
        tags = [tag for tag, taken in held_by(self.redis, {incarnation})[incarnation] if taken < taken_before]
        if not tags:
            return Counter()
        entries = self.redis.hmget(keys.UNACKED, tags) if tags else []
        held_tags, held_jobs = tags_in_hand(), in_hand()
        pipe = self.redis.pipeline(transaction=False)
        for tag, entry in zip(tags, entries, strict=True):
            message, queue, job_id = _returned(entry)
            if message is None or tag in held_tags or job_id in held_jobs:
                continue
            self._stranded(keys=[keys.job(job_id or "-"), keys.UNACKED, UNACKED_INDEX, queue or keys.QUEUE_INTERACTIVE],
                           args=[tag, incarnation, entry, message], client=pipe)
        replies = pipe.execute(raise_on_error=False)  # (one message refused does not hold back the others)
        for reply in replies:
            if isinstance(reply, redis.RedisError):
                log.warning("sending back a message stranded by a change of primary failed: %s", reply)
        outcomes = Counter(reply for reply in replies if isinstance(reply, str))
        if outcomes["sent"] or outcomes["dropped"]:
            log.warning("Redis's primary changed: %d messages this process no longer handled went back to their queues (their jobs run again), "
                        "%d of jobs already ended were dropped", outcomes["sent"], outcomes["dropped"])
        return outcomes


def _returned(entry: str | None) -> tuple[str | None, str, str | None]:
    """The message of an unacked entry as kombu would put it back (marked redelivered), its queue and
    the job it names; (None, '', None) for an entry that is not one this can put back (a named
    exchange, a priority queue)."""
    if entry is None:
        return None, "", None
    try:
        message, exchange, routing_key = json.loads(entry)
        if exchange or not isinstance(routing_key, str) or (message.get("properties") or {}).get("priority") not in (None, 0):
            return None, "", None
        message["headers"]["redelivered"] = True
        message["properties"]["delivery_info"]["redelivered"] = True
        job_id = named_job(message["headers"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, "", None
    return json.dumps(message), routing_key, job_id
