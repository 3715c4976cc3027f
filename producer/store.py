"""The job record in Redis: how it is laid out, and every state transition as one atomic step.

A record is the hash ``keys.job(id)``:
  state, created_at, started_at, finished_at, attempts, worker, request (JSON), result (JSON), error (JSON)
Each transition is a Lua script, so its writes, its expiry and its pub/sub event happen together or
not at all, and a record that reached a final state is never written again (the first final write
wins: a redelivered job cannot produce a second, different result).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from producer import keys
from producer.records import FINAL_STATES, JobError, JobRecord, JobResult, JobState

_FINAL = "{" + ", ".join(f"['{s.value}']=true" for s in FINAL_STATES) + "}"

# KEYS: record. ARGV: request JSON, now, pending ttl.
CREATE_SCRIPT = """
redis.call('HSET', KEYS[1], 'state', 'queued', 'created_at', ARGV[2], 'attempts', 0, 'request', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: record. ARGV: worker, now, pending ttl, request JSON (canonical), channel, max attempts.
# Returns {outcome, attempts, created_at}: outcome is 'run', 'final:<state>', 'mismatch' or 'exhausted'.
START_SCRIPT = f"""
local final = {_FINAL}
local state = redis.call('HGET', KEYS[1], 'state')
if state and final[state] then
  return {{'final:' .. state, tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0'), ''}}
end
if state then
  if redis.call('HGET', KEYS[1], 'request') ~= ARGV[4] then
    return {{'mismatch', 0, ''}}
  end
else
  redis.call('HSET', KEYS[1], 'created_at', ARGV[2], 'request', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
local done = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if done >= tonumber(ARGV[6]) then
  return {{'exhausted', done, ''}}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[2], 'worker', ARGV[1])
redis.call('PUBLISH', ARGV[5], cjson.encode({{event='state', state='running', attempts=attempts}}))
return {{'run', attempts, redis.call('HGET', KEYS[1], 'created_at')}}
"""

# KEYS: record. ARGV: state, now, ttl, field name ('result' or 'error'), JSON, channel, request JSON or ''.
# Returns 'ok', or the final state already there.
FINISH_SCRIPT = f"""
local final = {_FINAL}
local state = redis.call('HGET', KEYS[1], 'state')
if state and final[state] then
  return state
end
if ARGV[7] ~= '' and not state then
  redis.call('HSET', KEYS[1], 'request', ARGV[7], 'created_at', ARGV[2], 'attempts', 0)
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', ARGV[2], ARGV[4], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[6], cjson.encode({{event='state', state=ARGV[1]}}))
return 'ok'
"""


def canonical_json(value: Any) -> str:
    """The one serialisation used for stored requests, so equal requests compare equal as strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def now() -> float:
    return round(time.time(), 6)


@dataclass(frozen=True)
class StartOutcome:
    outcome: str  # 'run' | 'final:<state>' | 'mismatch' | 'exhausted'
    attempts: int
    queued_s: float = 0.0  # submission to this start

    @property
    def should_run(self) -> bool:
        return self.outcome == "run"


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
        request=json.loads(data["request"]) if data.get("request") else None,
        result=JobResult.model_validate_json(data["result"]) if data.get("result") else None,
        error=JobError.model_validate_json(data["error"]) if data.get("error") else None,
    )


def is_final_event(message: dict[str, Any] | None) -> bool:
    """Whether a pub/sub message on a job's channel announces a final state."""
    if not message or message.get("type") != "message":
        return False
    try:
        event = json.loads(message["data"])
    except (TypeError, ValueError):
        return False
    return event.get("event") == "state" and event.get("state") in {s.value for s in FINAL_STATES}


class JobStore:
    """Record transitions against a synchronous ``redis.Redis`` (decode_responses=True)."""

    def __init__(self, redis, *, result_ttl_s: int, pending_ttl_s: int):
        self.redis = redis
        self.result_ttl_s = result_ttl_s
        self.pending_ttl_s = pending_ttl_s
        self._create = redis.register_script(CREATE_SCRIPT)
        self._start = redis.register_script(START_SCRIPT)
        self._finish = redis.register_script(FINISH_SCRIPT)

    def create(self, job_id: str, request_json: str) -> None:
        self._create(keys=[keys.job(job_id)], args=[request_json, now(), self.pending_ttl_s])

    def delete(self, job_id: str) -> None:
        self.redis.delete(keys.job(job_id))

    def get(self, job_id: str) -> JobRecord | None:
        return record_from_hash(job_id, self.redis.hgetall(keys.job(job_id)))

    def start(self, job_id: str, *, worker: str, request_json: str, max_attempts: int) -> StartOutcome:
        started = now()
        outcome, attempts, created_at = self._start(
            keys=[keys.job(job_id)],
            args=[worker, started, self.pending_ttl_s, request_json, keys.job_channel(job_id), max_attempts],
        )
        return StartOutcome(outcome, int(attempts), max(0.0, started - float(created_at)) if created_at else 0.0)

    def succeed(self, job_id: str, result: JobResult) -> str:
        return self._finish_with(job_id, JobState.SUCCEEDED, "result", result.model_dump_json())

    def fail(self, job_id: str, error: JobError, *, request_json: str = "") -> str:
        return self._finish_with(job_id, JobState.FAILED, "error", error.model_dump_json(), request_json)

    def _finish_with(self, job_id: str, state: JobState, field: str, payload: str, request_json: str = "") -> str:
        return self._finish(
            keys=[keys.job(job_id)],
            args=[state.value, now(), self.result_ttl_s, field, payload, keys.job_channel(job_id), request_json],
        )

