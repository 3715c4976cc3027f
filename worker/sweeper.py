"""Finding jobs whose message was lost, and sending it again.

kombu's Redis transport takes a message off its queue (BRPOP) and only then records it as
unacknowledged: a worker that dies between the two (killed, a crashing job, the machine lost) loses
that message, and its job would stay queued for good. The queues are first-in first-out, and every
job has its number on its queue (producer/enqueue.py); starting a job takes it out of the queue's
waiting set and raises the queue's highest-started number. So a job still waiting behind a started
one was taken off the queue and never started: its message is lost. Such a job, found behind a
started one in two looks ``interval`` apart, gets its message again (at the head of its queue).

Sending a message twice is harmless: a job's first final state is its only one, and a message whose
job has ended is acknowledged without running. One worker looks at a time (a lock in Redis).
"""

from __future__ import annotations

import json
import logging
import threading
import time

import redis

from producer import keys
from producer.enqueue import task_message

log = logging.getLogger("belle.sweeper")

LOOK_AT = 1_000  # jobs per queue per look


class LostMessageSweeper:
    def __init__(self, client: redis.Redis, *, worker: str, interval_s: float, queues: tuple[str, ...] = keys.QUEUES):
        self.redis = client
        self.worker = worker
        self.interval_s = interval_s
        self.queues = queues
        self._suspects: dict[str, float] = {}  # job id → when first seen behind a started job
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="belle-sweeper", daemon=True)

    def start(self) -> LostMessageSweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                if self.redis.set(keys.SWEEP_LOCK, self.worker, nx=True, px=int(self.interval_s * 900)):
                    self.sweep()
            except redis.RedisError as exc:
                log.warning("looking for lost messages failed: %s", exc)

    def sweep(self) -> list[str]:
        """One look; returns the jobs whose message was sent again."""
        resent = []
        now = time.monotonic()
        suspects = {}
        for queue in self.queues:
            taken = int(self.redis.get(keys.queue_taken(queue)) or 0)
            if not taken:
                continue
            for job_id in self.redis.zrangebyscore(keys.queue_waiting(queue), 0, taken - 1, start=0, num=LOOK_AT):
                state, request = self.redis.hmget(keys.job(job_id), "state", "request")
                if state != "queued" or request is None:  # started meanwhile, cancelled, or expired: not waiting any more
                    self.redis.zrem(keys.queue_waiting(queue), job_id)
                    continue
                first_seen = self._suspects.get(job_id, now)
                suspects[job_id] = first_seen
                if now - first_seen >= self.interval_s:
                    self.redis.rpush(queue, task_message(job_id, json.loads(request), queue))
                    suspects[job_id] = now  # if this one is lost too, look again later
                    resent.append(job_id)
                    log.warning("job %s: its message was lost (a later job on %s has started); sent it again", job_id, queue)
        self._suspects = suspects
        return resent
