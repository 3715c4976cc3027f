"""The job record in Redis: how it is laid out, how a client reads it, and cancelling it.

A record is the hash ``keys.job(id)``:
  state, created_at, started_at, finished_at, attempts, worker, cancel_requested_at, request (JSON, in its
  stored form: producer/schemas.py ``stored_form``; read back with every field explicit), result (JSON),
  error (JSON); and what the scripts that move it on read (its queue's name and number there, its batch's
  id and line, its webhook: producer/lua/enqueue.lua, record.lua)
and a streaming job also has the stream ``keys.job_chunks(id)``: its chunks, then its end event.
Each transition is a Lua script (producer/lua/), so its writes, its expiry and, for a final state, its end
event on pub/sub happen together or not at all, and a record that reached a final state is never written again (the first final
write wins: a redelivered job cannot produce a second, different result). A client enqueues
(producer/enqueue.py) and cancels (here); the other transitions are the worker's (worker/serving/job_writes.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from producer import keys, lua
from producer.durability import Durability
from producer.errors import ErrorCode, JobNotFoundError
from producer.records import JobError, JobRecord, JobResult, JobState, StreamEnd, default_custom_id
from producer.schemas import full_form
from producer.stream_shards import StreamShards


def canonical_json(value: Any) -> str:
    """The one serialisation used for stored requests, so equal requests compare equal as strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def now() -> float:
    return round(time.time(), 6)


def record_from_hash(job_id: str, data: dict[str, str]) -> JobRecord | None:
    if not data or "state" not in data:
        return None

    def number(name: str) -> float | None:
        return float(data[name]) if data.get(name) else None

    return JobRecord(
        job_id=job_id,
        state=JobState(data["state"]),
        created_at=number("created_at"),
        started_at=number("started_at"),
        finished_at=number("finished_at"),
        attempts=int(data.get("attempts") or 0),
        worker=data.get("worker") or None,
        cancel_requested_at=number("cancel_requested_at"),
        request=full_form(json.loads(data["request"])) if data.get("request") else None,
        batch_id=data.get("batch_id") or None,
        custom_id=data.get("custom_id") or (default_custom_id(data["line"]) if data.get("batch_id") and data.get("line") else None),
        line=int(data["line"]) if data.get("line") else None,
        tenant=data.get("tenant") or None,
        result=JobResult.model_validate_json(data["result"]) if data.get("result") else None,
        error=JobError.model_validate_json(data["error"]) if data.get("error") else None,
    )


def is_final_event(message: dict[str, Any] | None) -> bool:
    """Whether a pub/sub message on a job's channel is its end event."""
    if not message or message.get("type") != "message":
        return False
    try:
        event = json.loads(message["data"])
    except (TypeError, ValueError):
        return False
    return isinstance(event, dict) and event.get("event") == "end"


def end_event(job_id: str, state: JobState, result: JobResult | None = None, error: JobError | None = None) -> str:
    reasons = [s.finish_reason for s in result.sequences] if result is not None else []
    return StreamEnd(job_id=job_id, state=state, finish_reasons=reasons, error=error).model_dump_json()


def cancelled_before_start(job_id: str) -> JobError:
    return JobError(code=ErrorCode.CANCELLED, message=f"job {job_id} was cancelled before it started")


def cancel_call(job_id: str, result_ttl_s: int, streams_apart: bool = False) -> dict[str, list]:
    """The keys and arguments of producer/lua/cancel.lua (the sync store and the async client run the same call).
    ``streams_apart``: the chunk streams live on shards (producer/stream_shards.py), not beside the record."""
    error = cancelled_before_start(job_id)
    return {
        "keys": [keys.job(job_id), keys.job_chunks(job_id)],
        "args": [now(), result_ttl_s, keys.job_channel(job_id), end_event(job_id, JobState.CANCELLED, error=error),
                 error.model_dump_json(), keys.CANCEL_CHANNEL, job_id, "1" if streams_apart else ""],
    }


def cancel_outcome(job_id: str, outcome: str) -> CancelOutcome:
    if outcome == "missing":
        raise JobNotFoundError(job_id)
    return CancelOutcome(outcome)


@dataclass(frozen=True)
class CancelOutcome:
    outcome: str  # 'cancelled' | 'requested' | 'requested_held' | 'final:<state>'

    @property
    def description(self) -> str:
        if self.outcome == "cancelled":
            return "cancelled before it started"
        if self.outcome == "requested":
            return "cancellation requested: the job stops at its next decoding step and keeps its partial text"
        if self.outcome == "requested_held":
            return "cancellation requested: a worker holds the job but has not started it; it ends cancelled without running"
        return f"already {self.outcome.removeprefix('final:')}; nothing to cancel"


class JobStore:
    """A job record's reading and cancelling (what clients do) against a synchronous ``redis.Redis``
    (decode_responses=True). The worker's transitions are worker/serving/job_writes.py's ``WorkerJobStore``."""

    def __init__(self, redis, *, result_ttl_s: int, pending_ttl_s: int, durability: Durability = Durability(), streams: StreamShards | None = None):
        self.redis = redis
        self.result_ttl_s = result_ttl_s
        self.pending_ttl_s = pending_ttl_s
        self.durability = durability  # final states (a cancel's too) wait for replicas (BELLE_WAIT_REPLICAS)
        self.streams = streams or StreamShards(redis)  # where the chunk streams live
        self._cancel = redis.register_script(lua.script("cancel"))

    def get(self, job_id: str) -> JobRecord | None:
        return record_from_hash(job_id, self.redis.hgetall(keys.job(job_id)))

    def cancel(self, job_id: str) -> CancelOutcome:
        return cancel_outcome(job_id, self.durability.run(self.redis, self._cancel, f"job {job_id}'s cancellation was written",
                                                          **cancel_call(job_id, self.result_ttl_s, self.streams.sharded)))
