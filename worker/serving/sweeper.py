"""Finding jobs whose message was lost, and sending it again; and sending back the messages of worker
processes that died (worker/serving/unacked.py), every couple of seconds.

kombu's Redis transport takes a message off its queue (BRPOP) and only then records it as
unacknowledged: a worker that dies between the two (killed, a crashing job, the machine lost) loses
that message, and its job would stay queued for good. Queues are first-in first-out, and every job
has its number on its queue (producer/enqueue.py; a job returned by a stopping worker is numbered
again, as the last): starting a job takes it out of the queue's waiting set and raises the queue's
highest-started number, and ending it takes it out too. So a job still waiting
  - behind a started one (a lower number than the highest started), or
  - on an empty queue, with no worker holding its message (none of the unacknowledged messages),
was taken off its queue and never started: its message is lost. A job found so in two looks
``interval`` apart gets its message again, at the head of its queue; not twice within the
visibility timeout.

A second copy of a message is harmless: a job's first final state is its only one, a message whose
job has ended is acknowledged without running, and one whose job runs on a live worker goes back to
the queue until the job has ended (worker/serving/lua/start.lua; worker/serving/handler.py). One worker
looks at a time (a lock in Redis).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from producer import fairness, keys, lua
from producer.enqueue import task_message
from producer.fleet import HEARTBEAT_S, live_workers
from worker.serving.lua import script
from worker.serving.unacked import HeldMessages

log = logging.getLogger("belle.sweeper")

LOOK_AT = 1_000  # waiting jobs looked at per queue per look
# A message taken this long ago that this process does not handle is not on its way to a task thread: it was stranded.
STRANDED_AFTER_S = 2.0


class Sweeper:
    def __init__(self, client: redis.Redis, *, worker: str, interval_s: float, resend_gap_s: float, reclaim_s: float = HEARTBEAT_S, writes=None,
                 bulk_ready_jobs: int = 64, incarnation: str | None = None, in_hand: Callable[[], set[str]] | None = None,
                 tags_in_hand: Callable[[], set[str]] | None = None):
        self.redis = client
        self.bulk_ready_jobs = bulk_ready_jobs
        self.worker = worker
        self.interval_s = interval_s
        self.reclaim_s = min(reclaim_s, interval_s)
        self.resend_gap_s = max(resend_gap_s, 2 * interval_s)
        self.writes = writes  # a RedisWrites: a look refused for lack of memory is noted there, not logged each time
        self.held = HeldMessages(client)
        self._resend = client.register_script(script("resend"))
        self._feed = client.register_script(lua.script("fair_feed_now"))
        self._suspects: dict[str, float] = {}  # job id → when first found lost
        self.incarnation = incarnation  # this process, and the jobs it handles now: for its messages stranded by a change of primary
        self.in_hand = in_hand
        self.tags_in_hand = tags_in_hand or set
        self._primary: str | None = None  # the run id of the Redis server last seen
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="belle-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)

    def _run(self) -> None:
        next_sweep = time.monotonic() + self.interval_s
        while not self._stopping.wait(self.reclaim_s):
            self._after_a_change_of_primary()
            self._once(keys.RECLAIM_LOCK, self.reclaim_s, self.held.reclaim_dead, "looking for messages of dead workers")
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.interval_s
                self._once(keys.SWEEP_LOCK, self.interval_s, self.sweep, "looking for lost messages")

    def _after_a_change_of_primary(self) -> None:
        """Once Redis answers from another server (a failover promoted a replica) or a restarted one, send back the
        messages this process is recorded as holding but no longer handles (worker/serving/unacked.py)."""
        if self.incarnation is None or self.in_hand is None:
            return
        try:
            primary = self.redis.info("server")["run_id"]
            if self._primary is not None and primary != self._primary:
                self.held.reclaim_stranded(self.incarnation, self.in_hand, self.tags_in_hand, taken_before=time.time() - STRANDED_AFTER_S)
            self._primary = primary
        except redis.RedisError as exc:  # (tried again at the next look: the run id is kept until it succeeds)
            if self.writes is None or not self.writes.refused(exc, "looking for messages stranded by a change of primary"):
                log.warning("looking for messages stranded by a change of primary failed: %s", exc)

    def _once(self, lock: str, interval_s: float, look, what: str) -> None:
        """``look()``, unless another worker did within this interval (one looks at a time)."""
        try:
            if self.redis.set(lock, self.worker, nx=True, px=int(interval_s * 900)):
                look()
        except redis.RedisError as exc:
            if self.writes is None or not self.writes.refused(exc, what):
                log.warning("%s failed: %s", what, exc)

    def queues(self) -> list[str]:
        """The queues to look at: ours, and any a live worker consumes."""
        return sorted(set(keys.QUEUES) | {q for w in live_workers(self.redis) for q in w.queues})

    def sweep(self) -> list[str]:
        """One look; returns the jobs whose message was sent again."""
        resent, suspects, now = [], {}, time.monotonic()
        held: str | None = None  # the messages workers hold, read once if needed
        queues = self.queues()
        for queue in queues:  # (starting jobs feeds a fairly shared queue too; this is in case none start)
            if call := fairness.feed_call(queue, self.bulk_ready_jobs):
                self._feed(**call)
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.get(keys.queue_taken(queue))
            pipe.llen(queue)
        marks = pipe.execute()
        for queue, taken, length in zip(queues, marks[::2], marks[1::2], strict=True):
            taken, empty = int(taken or 0), length == 0
            top = "+inf" if empty else taken - 1
            waiting = self.redis.zrangebyscore(keys.queue_waiting(queue), 0, top, start=0, num=LOOK_AT, withscores=True)
            if not waiting:
                continue
            pipe = self.redis.pipeline(transaction=False)
            for job_id, _ in waiting:
                pipe.hmget(keys.job(job_id), "state", "request")
            gone = []
            for (job_id, seq), (state, request) in zip(waiting, pipe.execute(), strict=True):
                if state != "queued" or request is None:  # started, ended or expired meanwhile: it does not wait any more
                    gone.append(job_id)
                    continue
                if seq >= taken:  # nothing later has started: lost only if no worker holds it
                    held = held if held is not None else "\n".join(self.redis.hvals(keys.UNACKED))
                    if job_id in held:
                        continue
                first_seen = self._suspects.get(job_id, now)
                suspects[job_id] = first_seen
                if now - first_seen < self.interval_s:
                    continue
                if self._resend(keys=[keys.job(job_id), queue], args=[task_message(job_id, None, queue), time.time(), self.resend_gap_s]):
                    resent.append(job_id)
                    log.warning("job %s: its message was lost (%s); sent it again", job_id,
                                f"a later job on {queue} has started" if seq < taken else f"{queue} is empty and no worker holds it")
            if gone:
                self.redis.zrem(keys.queue_waiting(queue), *gone)
        self._suspects = suspects
        return resent
