"""The failover scenario, shared by tests/test_failover.py and benchmarks/failover.py: a client submits jobs
through a sentinel URL while a worker runs them; the primary is SIGKILLed mid-run, the sentinels promote
the replica, the old primary is started again (as a supervisor would) and comes back as a replica.

What is counted, from the client's side:
- lost: jobs whose submit returned an id but which never reached a final state;
- two finals: jobs seen in a final state and later seen otherwise (another final state, or not final):
  a final state the new primary never received, the job run again;
- refused: submits that raised (the producer tries each again, with the same idempotency key), and the
  longest stretch of time during which every submit was refused;
- failover: the kill until the sentinels name the replica; resumed: the kill until the worker first started
  a job again (a probe job is submitted as soon as the sentinels name the replica, so that there is one);
  rejoined: the old primary's restart until it replicates the new one.

``partitioned``: the replication link to the replica stops passing writes on just before the kill (three
submits are made meanwhile), so that the primary dies holding writes no replica has: the case that
BELLE_WAIT_REPLICAS is for.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import redis

from producer import keys
from producer.client import JobClient
from producer.records import JobState
from producer.settings import Settings
from tests.sentinels import SentinelGroup
from tests.waiting import stays, wait_for

FINAL = {s.value for s in JobState if s not in (JobState.QUEUED, JobState.RUNNING)}
REQUEST = {"num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 4}
RETRY_PAUSE_S, PACE_S = 0.05, 0.005


@dataclass
class FailoverRun:
    submitted: int = 0
    refused: int = 0
    refused_s: float = 0.0
    lost: list[str] = field(default_factory=list)
    two_finals: list[str] = field(default_factory=list)
    ran_again: int = 0  # jobs a worker began generating more than once
    failover_s: float = 0.0
    resumed_s: float = 0.0
    rejoined_s: float = 0.0
    unchanged_after_rejoin: bool = False
    held_bytes: int = 0  # (partitioned) the primary's writes no replica had acknowledged when it was killed

    def summary(self) -> dict:
        return {"submits returned": self.submitted, "lost": len(self.lost), "two final states": len(self.two_finals), "ran again": self.ran_again,
                "submits refused": self.refused, "longest refusal (s)": round(self.refused_s, 2), "failover (s)": round(self.failover_s, 2),
                "worker resumed (s)": round(self.resumed_s, 2), "old primary rejoined (s)": round(self.rejoined_s, 2),
                "unchanged after rejoin": self.unchanged_after_rejoin, "bytes held back at the kill": self.held_bytes}


def _submitted(client: JobClient, request: dict) -> str | None:
    try:
        return client.submit(request)
    except redis.RedisError:
        return None


class Producer(threading.Thread):
    """Submits ``jobs`` jobs one after another, each until it is accepted (same idempotency key)."""

    def __init__(self, url: str, jobs: int, tag: str, *, wait_replicas: int, wait_timeout_ms: int, deadline_s: float):
        super().__init__(daemon=True)
        self.settings = Settings(redis_url=url, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms)
        self.jobs, self.tag, self.deadline_s = jobs, tag, deadline_s
        self.returned: list[str] = []
        self.outcomes: list[tuple[float, bool]] = []  # (when, accepted) per attempt
        self.attempts = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.deadline_s
        try:
            with JobClient(self.settings) as client:
                for i in range(self.jobs):
                    request = {"prompt": f"failover {self.tag} {i}", "idempotency_key": f"{self.tag}-{i}", **REQUEST}
                    while True:
                        self.attempts += 1
                        try:
                            job_id = client.submit(request)
                        except redis.RedisError:
                            self.outcomes.append((time.monotonic(), False))
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(RETRY_PAUSE_S)  # (a producer's own back-off between attempts, not a wait for a condition)
                            continue
                        self.outcomes.append((time.monotonic(), True))
                        self.returned.append(job_id)
                        break
                    time.sleep(PACE_S)  # (the submit rate: a producer paced as a service would be)
        except BaseException as exc:  # (reported by the scenario)
            self.failure = exc

    def refusals(self) -> tuple[int, float]:
        refused = sum(not ok for _, ok in self.outcomes)
        longest, since = 0.0, None
        for when, ok in self.outcomes:
            if not ok and since is None:
                since = when
            elif ok and since is not None:
                longest, since = max(longest, when - since), None
        return refused, longest


class Watcher(threading.Thread):
    """Reads every returned job's record over and over; notes each job's first final state and any later
    read that differs from it."""

    def __init__(self, url: str, producer: Producer):
        super().__init__(daemon=True)
        self.client = JobClient(Settings(redis_url=url))
        self.producer = producer
        self.first_final: dict[str, tuple[str, str]] = {}
        self.changed: set[str] = set()
        self._done = threading.Event()

    def read(self, job_ids: list[str]) -> list[tuple[str | None, str | None]]:
        pipe = self.client.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), "state", "finished_at")
        return pipe.execute()

    def run(self) -> None:
        while not self._done.is_set():
            job_ids = list(self.producer.returned)
            try:
                states = self.read(job_ids)
            except redis.RedisError:
                self._done.wait(0.1)
                continue
            for job_id, (state, finished_at) in zip(job_ids, states, strict=True):
                seen = self.first_final.get(job_id)
                if seen is None:
                    if state in FINAL:
                        self.first_final[job_id] = (state, finished_at)
                elif seen != (state, finished_at):
                    self.changed.add(job_id)
            self._done.wait(0.05)  # (a poll interval, cut short by stop())

    def stop(self) -> None:
        self._done.set()
        self.join(10)
        self.client.close()


def run_failover(group: SentinelGroup, *, jobs: int = 300, wait_replicas: int = 0, wait_timeout_ms: int = 1000, partitioned: bool = False,
                 tag: str = "run", settle_s: float = 3.0, deadline_s: float = 240.0) -> FailoverRun:
    """One run against ``group``, whose URL a live worker already serves (with fast lost-message sweeps)."""
    result = FailoverRun()
    producer = Producer(group.url, jobs, tag, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms, deadline_s=deadline_s)
    watcher = Watcher(group.url, producer)
    old_primary = group.primary_port()
    replica = next(port for port in group.ports if port != old_primary and group.role(port)[0] == "slave")
    producer.start()
    watcher.start()
    try:
        wait_for(lambda: len(producer.returned) >= jobs // 3 or not producer.is_alive(), deadline_s, f"{jobs // 3} submits returned")
        link = group.partition(replica, old_primary) if partitioned else None
        if link is not None:
            attempts = producer.attempts
            wait_for(lambda: producer.attempts >= attempts + 4 or not producer.is_alive(), deadline_s, "three submits made while the link held")
            result.held_bytes = group.held_bytes(old_primary)
        group.kill(old_primary)  # (returns once it is dead: what is written after this is on the new primary)
        killed, killed_wall = time.monotonic(), time.time()
        if link is not None:
            link.cut()
        wait_for(lambda: group.primary_port() == replica, 60, f"the sentinels promoted the replica:\n{group.logs()}")
        result.failover_s = time.monotonic() - killed
        with JobClient(Settings(redis_url=group.url)) as probe:  # a job to take, whatever the producer does (no WAIT: none may be left to confirm)
            probe_id = wait_for(lambda: _submitted(probe, {"prompt": f"failover {tag} probe", **REQUEST}), 60, "a probe job was accepted")
        restarted = time.monotonic()
        group.start_server(old_primary)  # with its append-only file: it has the writes the new primary lacks, and gives them up
        wait_for(lambda: group.role(old_primary) == ("slave", replica), 120, f"the old primary rejoined as a replica:\n{group.logs()}")
        result.rejoined_s = time.monotonic() - restarted
        producer.join(deadline_s)
        if producer.failure is not None:
            raise producer.failure
        client = watcher.client

        def settled():
            states = watcher.read(producer.returned)
            return all(state in FINAL or state is None for state, _ in states) and states

        def unsettled() -> str:
            pipe = client.redis.pipeline(transaction=False)
            for job_id in producer.returned:
                pipe.hmget(keys.job(job_id), "state", "holder", "attempts", "generating")
            stuck = [(job_id, *fields) for job_id, fields in zip(producer.returned, pipe.execute(), strict=True) if fields[0] not in FINAL and fields[0]]
            queues = {name: client.redis.llen(name) for name in (keys.QUEUE_INTERACTIVE, keys.QUEUE_BULK)}
            return f"every returned job ended or is gone; not yet: {len(stuck)} (job, state, holder, attempts, generating): {stuck[:5]}; queues {queues}"

        states = wait_for(settled, deadline_s, unsettled)
        result.submitted = len(producer.returned)
        result.refused, result.refused_s = producer.refusals()
        result.lost = [job_id for job_id, (state, _) in zip(producer.returned, states, strict=True) if state is None]
        started = client.redis.pipeline(transaction=False)
        for job_id in [*producer.returned, probe_id]:
            started.hget(keys.job(job_id), "started_at")
        result.resumed_s = min(float(t) for t in started.execute() if t and float(t) > killed_wall) - killed_wall
        attempts = client.redis.pipeline(transaction=False)
        for job_id in producer.returned:
            attempts.hget(keys.job(job_id), "attempts")
        result.ran_again = sum(int(a or 0) > 1 for a in attempts.execute())
        # Nothing changes once the old primary is back: the records stay as they are, the roles too.
        snapshot = watcher.read(producer.returned)
        try:
            stays(lambda: (watcher.read(producer.returned) == snapshot and group.primary_port() == replica
                           and group.role(old_primary) == ("slave", replica)), settle_s, "nothing changed after the rejoin")
            result.unchanged_after_rejoin = True
        except AssertionError:
            result.unchanged_after_rejoin = False
    finally:
        watcher.stop()
    result.two_finals = sorted(watcher.changed)
    return result
