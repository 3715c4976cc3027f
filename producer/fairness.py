"""Fair shares of the bulk queue between batches and tenants.

A bulk job that finds the bulk queue holding ``BELLE_BULK_READY_JOBS`` messages waits in a line of its own
instead: its batch's line, or its tenant's line of single bulk jobs. The lines feed the queue one job at a
time in turn (round robin over tenants, then over each tenant's lines) as jobs are enqueued and as workers
start them (producer/lua/fair_feed.lua). So a 100-line batch submitted behind a million-line one starts after
the few jobs already on the queue, and two batches progress at the same rate, while interactive jobs, on their
own queue, still go first.
"""

from __future__ import annotations

from dataclasses import dataclass

from producer import keys
from producer.lua import script

FAIR_QUEUES = frozenset({keys.QUEUE_BULK})


def line_keys(queue: str, tenant: str, batch_id: str = "") -> tuple[str, str, str]:
    """enqueue.lua's arguments for a job's line: the queue's tenants list, the tenant's list of lines, the
    job's line; empty strings for a queue that is not shared fairly."""
    if queue not in FAIR_QUEUES:
        return "", "", ""
    return keys.fair_tenants(queue), keys.fair_tenant(queue, tenant), keys.fair_line(queue, tenant, batch_id)


@dataclass(frozen=True)
class WaitingJobs:
    """Jobs of one queue not started yet: on the queue, held by a worker before it starts them, or in their lines."""

    count: int
    oldest_created_at: float | None  # submission time of the longest-waiting one


def waiting_jobs(redis, queue: str) -> WaitingJobs:
    """How many jobs of ``queue`` wait, and since when the oldest does (one look: a few round trips, one
    command per line)."""
    pipe = redis.pipeline(transaction=False)
    pipe.zcard(keys.queue_waiting(queue))
    pipe.zrange(keys.queue_waiting(queue), 0, 0)
    pipe.lrange(keys.fair_tenants(queue), 0, -1)
    count, first, tenants = pipe.execute()
    lines: list[str] = []
    if tenants:
        pipe = redis.pipeline(transaction=False)
        for tenant in tenants:
            pipe.lrange(tenant, 0, -1)
        lines = [line for found in pipe.execute() for line in found]
    heads: list[str] = list(first)
    if lines:
        pipe = redis.pipeline(transaction=False)
        for line in lines:
            pipe.llen(line)
            pipe.lindex(line, 0)
        found = pipe.execute()
        count += sum(found[::2])
        heads += [entry.partition(" ")[0] for entry in found[1::2] if entry]
    oldest = None
    if heads:
        pipe = redis.pipeline(transaction=False)
        for job_id in heads:
            pipe.hget(keys.job(job_id), "created_at")
        times = [float(created) for created in pipe.execute() if created]
        oldest = min(times) if times else None
    return WaitingJobs(count, oldest)


def drop_call(queue: str, tenant: str, batch_id: str) -> dict[str, list] | None:
    """fair_drop.lua's keys, to take a batch's line out of the fair-share lines (its jobs have been cancelled);
    None for a queue that is not shared fairly."""
    tenants, tenant_lines, line = line_keys(queue, tenant, batch_id)
    return {"keys": [tenants, tenant_lines, line]} if line else None


def feed_call(queue: str, depth: int) -> dict[str, list] | None:
    """fair_feed_now.lua's keys and arguments, to put jobs from ``queue``'s lines on it until it holds ``depth``;
    None for a queue that is not shared fairly."""
    if queue not in FAIR_QUEUES:
        return None
    return {"keys": [queue, keys.fair_tenants(queue), keys.queue_sequence(queue), keys.queue_waiting(queue)], "args": [depth]}


def feed(redis, queue: str, depth: int) -> int:
    """Put jobs from ``queue``'s lines on it until it holds ``depth`` now; returns how many went (a worker's
    sweeper registers the script once and uses ``feed_call``)."""
    call = feed_call(queue, depth)
    return int(redis.register_script(script("fair_feed_now"))(**call)) if call else 0
