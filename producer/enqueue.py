"""Enqueueing jobs: the job's record and its Celery message written by one Lua script (producer/lua/enqueue.lua), atomically.

A job is either wholly enqueued (record, message on its queue, batch bookkeeping) or not at all,
whatever happens to the submitting process; and submitting it again (same job id: see ``job_id_for``)
finds its record and enqueues nothing. The message is the one Celery's ``send_task`` would publish
(task protocol 2, JSON, kombu's Redis envelope), built here so that a whole chunk of jobs goes in one
pipeline: one round trip per chunk instead of two per job.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from producer import fairness, keys
from producer.errors import ErrorCode, InvalidRequestError
from producer.records import JobError, default_custom_id
from producer.schemas import GenerationRequest, stored_form
from producer.settings import Settings
from producer.store import canonical_json

# Job ids derived from an idempotency key (or a batch id and line) are UUID5s in this namespace.
NAMESPACE = uuid.UUID("6c0f1e8a-2f5d-4f2b-9a4e-5b1d0c3e7a91")

BATCH_CANCELLED_JSON = JobError(code=ErrorCode.CANCELLED, message="the batch was cancelled while it was being submitted; this job never ran").model_dump_json()


def new_job_id() -> str:
    return uuid.uuid4().hex


def derived_job_id(key: str) -> str:
    return uuid.uuid5(NAMESPACE, key).hex


def job_id_for(request: GenerationRequest, tenant: str = "") -> str:
    """A fresh id, or with an idempotency key always the same one for that key (and tenant: two
    tenants' keys never meet)."""
    if request.idempotency_key is None:
        return new_job_id()
    return derived_job_id(f"idempotency:{tenant}:{request.idempotency_key}" if tenant else f"idempotency:{request.idempotency_key}")


def enqueue_item(validated: GenerationRequest, queue: str, fields: tuple[tuple[str, str], ...] = ()) -> Enqueue:
    """A single (not batch) job to enqueue: a fresh id, or the idempotency key's. ``fields``: what the
    record holds besides (``tenant``...)."""
    return Enqueue(job_id_for(validated, dict(fields).get("tenant", "")), validated.to_wire(), queue, fields=fields + webhook_fields(validated))


def webhook_fields(request: GenerationRequest) -> tuple[tuple[str, str], ...]:
    """The record fields the transition scripts read to append the job's webhook events (producer/lua/events.lua)."""
    if request.webhook is None:
        return ()
    return ("webhook", request.webhook), ("webhook_events", ",".join(request.webhook_events_filter))


def task_message(job_id: str, request_wire: dict[str, Any] | None, queue: str) -> str:
    """The message Celery's send_task would put on ``queue`` for ``belle.generate(job_id)``: task protocol 2,
    JSON, with only the headers a worker reads and its body not base64-encoded. The producer's messages carry
    no request (``request_wire`` None): the worker reads it from the job's record, so that a waiting job holds
    its request once (issue 20); one that carries a request (a message from an earlier version) is checked
    against the record. The message is a pure function of its arguments (its delivery tag is the job's id; a
    worker gives each message it takes a tag of its own), so Lua builds the same (``message_for``,
    producer/lua/__init__.py)."""
    kwargs = {"job_id": job_id} if request_wire is None else {"job_id": job_id, "request": request_wire}
    return json.dumps({
        "body": json.dumps([[], kwargs, {}], ensure_ascii=False, separators=(",", ":")),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": keys.TASK_GENERATE, "id": job_id, "root_id": job_id, "ignore_result": True},
        "properties": {"delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0, "delivery_tag": job_id},
    }, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Enqueue:
    """One job to enqueue: its id, validated request (wire form) and queue, and for a batch job, its
    batch and place in it."""

    job_id: str
    wire: dict[str, Any]
    queue: str
    batch_id: str = ""
    custom_id: str = ""
    line: int = 0
    fields: tuple[tuple[str, str], ...] = ()  # more record fields: tenant, webhook, webhook_events

    def call(self, now: float, settings: Settings) -> dict[str, list]:
        """The keys and arguments of producer/lua/enqueue.lua."""
        batch = keys.batch(self.batch_id) if self.batch_id else ""
        line = fairness.line_keys(self.queue, dict(self.fields).get("tenant", ""), self.batch_id)
        return {
            "keys": [keys.job(self.job_id), self.queue, batch or keys.job(self.job_id), keys.batch_jobs(self.batch_id) if self.batch_id else keys.job(self.job_id),
                     keys.queue_sequence(self.queue), keys.queue_waiting(self.queue)],
            "args": [canonical_json(stored_form(self.wire)), now, settings.pending_ttl_s, task_message(self.job_id, None, self.queue), self.job_id, batch,
                     self.batch_id, "" if self.custom_id == default_custom_id(self.line) else self.custom_id, self.line, self.queue, canonical_json(self.wire),
                     BATCH_CANCELLED_JSON if self.batch_id else "", *line, settings.bulk_ready_jobs,
                     *(part for pair in self.fields for part in pair)],
        }


def check_outcome(outcome: str, item: Enqueue) -> None:
    if outcome == "conflict":
        key = item.wire.get("idempotency_key")
        raise InvalidRequestError.single("idempotency_key", key, f"idempotency_key {key!r} was already used for a different request (job {item.job_id}); "
                                                                 "use a new key for a new request")
