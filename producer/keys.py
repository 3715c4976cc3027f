"""Every Redis key, pub/sub channel, queue and task name the system uses, built here and nowhere else."""

import re

from producer.errors import InvalidRequestError

PREFIX = "belle"

TASK_GENERATE = "belle.generate"
QUEUE_INTERACTIVE = "belle.interactive"
QUEUE_BULK = "belle.bulk"
QUEUES = (QUEUE_INTERACTIVE, QUEUE_BULK)
QUEUE_NAMES = {"interactive": QUEUE_INTERACTIVE, "bulk": QUEUE_BULK}  # the short names clients (CLI, gateway) use

# Job ids (the producer makes hex UUIDs) and batch ids (a caller may choose one) go into key names.
ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def checked_id(parameter: str, value: object) -> str:
    """``value`` if it is a well-formed job or batch id; otherwise InvalidRequestError naming ``parameter``."""
    if isinstance(value, str) and ID.match(value):
        return value
    shown = ascii(value[:80]) if isinstance(value, str) else type(value).__name__
    raise InvalidRequestError.single(parameter, shown, f"{parameter} must be 1 to 64 letters, digits, '_' or '-', got {shown}")


def job(job_id: str) -> str:
    """Hash holding a job's record (state, timestamps, request, result or error)."""
    return f"{PREFIX}:job:{job_id}"


def job_channel(job_id: str) -> str:
    """Pub/sub channel with a job's end event (what ``wait`` wakes on; chunks are in ``job_chunks`` only). It has
    the name of the job's record on purpose, and that is no clash: pub/sub channels are not keys (Redis keeps
    them apart), and subscribers outside this code know the channel by that name (docs/streaming.md)."""
    return job(job_id)


def job_chunks(job_id: str) -> str:
    """Stream with a job's chunks and its end event, replayed to readers that arrive late (on the job's stream
    shard with BELLE_STREAM_REDIS_URLS: producer/stream_shards.py)."""
    return f"{PREFIX}:job:{job_id}:chunks"


def batch(batch_id: str) -> str:
    """Hash of a batch: its counts by state (kept by the job transitions), total, times, state."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_jobs(batch_id: str) -> str:
    """List of a batch's job ids, in input order."""
    return f"{PREFIX}:batch:{batch_id}:jobs"


def batch_refused(batch_id: str) -> str:
    """List of a batch's refused lines (JSON: line, custom_id, message, parameter), in input order."""
    return f"{PREFIX}:batch:{batch_id}:refused"


def file(file_id: str) -> str:
    """Hash of a file uploaded to the gateway: its OpenAI file object's fields, and its tenant."""
    return f"{PREFIX}:file:{file_id}"


def file_lines(file_id: str) -> str:
    """List of an uploaded file's non-blank lines."""
    return f"{PREFIX}:file:{file_id}:lines"


def tenant_batches(tenant: str) -> str:
    """Sorted set of a gateway tenant's batches, by creation time ("" is the anonymous tenant)."""
    return f"{PREFIX}:tenant:{tenant or '-'}:batches"


def queue_sequence(queue: str) -> str:
    """Counter numbering the jobs enqueued on a queue, in the order a worker takes them."""
    return f"{PREFIX}:queue:{queue}:seq"


def queue_waiting(queue: str) -> str:
    """Sorted set of a queue's jobs not started yet, by their number on the queue."""
    return f"{PREFIX}:queue:{queue}:waiting"


def queue_taken(queue: str) -> str:
    """The highest number on a queue that a worker has started."""
    return f"{PREFIX}:queue:{queue}:taken"


def fair_tenants(queue: str) -> str:
    """List of the tenants' line lists (``fair_tenant``) with jobs waiting to go on QUEUE, in the order they
    are served (producer/fairness.py)."""
    return f"{PREFIX}:fair:{queue}:tenants"


def fair_tenant(queue: str, tenant: str) -> str:
    """List of a tenant's lines (``fair_line``) with jobs waiting to go on QUEUE, in the order they are served."""
    return f"{PREFIX}:fair:{queue}:tenant:{tenant or '-'}"


def fair_line(queue: str, tenant: str, batch_id: str = "") -> str:
    """List of the jobs of one line (a batch, or a tenant's single jobs) waiting to go on QUEUE: each
    "JOB_ID MESSAGE", first in first out."""
    line = f"batch:{batch_id}" if batch_id else "jobs"
    return f"{PREFIX}:fair:{queue}:tenant:{tenant or '-'}:{line}"


def worker_alive(incarnation: str) -> str:
    """Present while a worker process lives (renewed by its heartbeat): a job it holds is not taken over."""
    return f"{PREFIX}:alive:{incarnation}"


# Set of the worker processes (incarnations) that may hold messages: where dead ones are looked for.
HOLDERS = f"{PREFIX}:holders"

# Held by the worker that looks for lost messages, so that one looks at a time.
SWEEP_LOCK = f"{PREFIX}:sweep"
# Held by the worker that looks for dead workers' messages (worker/serving/unacked.py), so that one looks at a time.
RECLAIM_LOCK = f"{PREFIX}:reclaim"

# kombu's Redis transport's hash of the messages workers hold (unacknowledged), by delivery tag.
UNACKED = "unacked"


def worker(name: str) -> str:
    """A live worker's announcement (JSON WorkerInfo), renewed by its heartbeat; expires when it stops."""
    return f"{PREFIX}:worker:{name}"


# Sorted set of worker names by their last heartbeat: where the live announcements are found (without
# scanning the keyspace, which holds every job).
WORKERS_SEEN = f"{PREFIX}:workers"


# Hash: the jobs that ended, cluster-wide, by "STATE:ERROR_CODE" ('' for no error), counted by every script that
# writes a final state (producer/lua/stats.lua); read at scrape time by the fleet metrics (producer/fleet_metrics.py).
JOBS_ENDED = f"{PREFIX}:stats:ended"

# Sorted set of the batches not completed yet (their hashes' keys, ``batch(id)``) by creation time: added when a
# batch opens (producer/lua/batch_open.lua), removed when it completes (producer/lua/events.lua); the fleet
# metrics read their progress.
OPEN_BATCHES = f"{PREFIX}:batches:open"


def rate(tenant: str, minute: int) -> str:
    """Counter of a gateway tenant's requests in one minute (expires after two)."""
    return f"{PREFIX}:rate:{tenant}:{minute}"


# Stream of webhook events (job start and completion, batch completion), appended by the transition
# scripts and consumed by the gateways' deliverers (consumer group WEBHOOK_GROUP).
WEBHOOKS = f"{PREFIX}:webhooks"
WEBHOOK_GROUP = "deliverers"
# Hash: a webhook event's delivery attempts so far (event id → JSON), while it is retried.
WEBHOOK_ATTEMPTS = f"{PREFIX}:webhooks:attempts"

# Every worker listens here for the ids of running jobs whose cancellation was requested.
CANCEL_CHANNEL = f"{PREFIX}:cancel"


# String: a counter written just before each WAIT (producer/durability.py), so that the connection waiting has
# written after whatever it asks about, even when its own write changed nothing (an idempotent repeat).
REPLICATION_MARK = f"{PREFIX}:replication_mark"
