"""The job record in Redis: how it is laid out, and every state transition as one atomic step.

A record is the hash ``keys.job(id)``:
  state, created_at, started_at, finished_at, attempts, worker, cancel_requested_at, request (JSON),
  result (JSON), error (JSON)
and a streaming job also has the stream ``keys.job_chunks(id)``: its chunks, then its end event.
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
from producer.errors import ErrorCode, JobNotFoundError
from producer.records import FINAL_STATES, JobError, JobRecord, JobResult, JobState, StreamEnd

_FINAL = "{" + ", ".join(f"['{s.value}']=true" for s in FINAL_STATES) + "}"

# A batch job's record holds its batch's key ('batch'): each state change moves one count there, in
# the same script, so the batch's counts are always those of its jobs. A job leaves its queue's
# waiting set (named in its record: 'k_waiting') when it starts or ends.
# A job's or a batch's webhook event, appended to the webhooks stream in the script of the transition
# itself (durable: the gateway's deliverers consume it, producer/gateway/webhooks.py). A batch that has
# ended (none of its jobs queued or running, its submission done) is marked completed, once.
WEBHOOK_STREAM_MAX = 1_000_000  # the webhooks stream keeps about this many events (delivered ones are acknowledged, not deleted)

EVENTS_LUA = f"""
local function webhook_event(hash, kind, id, event)
  local hook = redis.call('HGET', hash, 'webhook')
  if hook and string.find(',' .. (redis.call('HGET', hash, 'webhook_events') or '') .. ',', ',' .. event .. ',', 1, true) then
    redis.call('XADD', '{keys.WEBHOOKS}', 'MAXLEN', '~', '{WEBHOOK_STREAM_MAX}', '*', 'kind', kind, 'event', event, 'id', id, 'url', hook,
               'tenant', redis.call('HGET', hash, 'tenant') or '')
  end
end

local function batch_completed(batch)
  local counts = redis.call('HMGET', batch, 'state', 'queued', 'running')
  if counts[1] ~= 'submitting' and tonumber(counts[2] or '0') <= 0 and tonumber(counts[3] or '0') <= 0
     and redis.call('HSETNX', batch, 'completed_at', redis.call('TIME')[1]) == 1 then
    webhook_event(batch, 'batch', redis.call('HGET', batch, 'batch_id') or '', 'completed')
  end
end
"""

_BATCH_MOVE = EVENTS_LUA + """
local function stop_waiting()
  local waiting = redis.call('HGET', KEYS[1], 'k_waiting')
  if waiting then
    redis.call('ZREM', waiting, redis.call('HGET', KEYS[1], 'job_id') or '')
  end
end

local function batch_move(from, to)
  local batch = redis.call('HGET', KEYS[1], 'batch')
  if not batch or redis.call('EXISTS', batch) == 0 then
    return nil  -- no batch, or it has expired: it is not recreated
  end
  if from and from ~= to then
    redis.call('HINCRBY', batch, from, -1)
    redis.call('HINCRBY', batch, to, 1)
    if to ~= 'queued' and to ~= 'running' then
      batch_completed(batch)
    end
  end
  return batch
end
"""

# KEYS: record. ARGV: request JSON, now, pending ttl.
CREATE_SCRIPT = """
redis.call('HSET', KEYS[1], 'state', 'queued', 'created_at', ARGV[2], 'attempts', 0, 'request', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: record, chunks. (The queue's waiting set and taken mark are named in the record.) ARGV: worker, now, pending
# ttl, request JSON (canonical), channel, max attempts, job id, liveness key prefix, this worker
# process's incarnation (its liveness key's suffix), '1' to take over a job this process's record
# says it holds but does not (its first start's reply was lost, the call retried).
# Returns {outcome, attempts, created_at}; outcome: 'run', 'final:<state>', 'mismatch', 'held' (running
# on another live worker), 'held_here' (running on this one), 'cancel' (its cancellation was requested
# while an earlier attempt ran), 'exhausted', 'undeliverable'. The attempts are counted when the job
# starts generating (GENERATING_SCRIPT), not here: a job a worker held when it died, but had not
# started, is not charged for it.
START_SCRIPT = _BATCH_MOVE + f"""
local final = {_FINAL}
local state = redis.call('HGET', KEYS[1], 'state')
if state and final[state] then
  stop_waiting()
  return {{'final:' .. state, tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0'), ''}}
end
if state then
  if redis.call('HGET', KEYS[1], 'request') ~= ARGV[4] then
    return {{'mismatch', 0, ''}}
  end
  -- Running on a worker that is alive (announced): this is not a redelivery after its death.
  if state == 'running' then
    local holder = redis.call('HGET', KEYS[1], 'holder')
    if holder == ARGV[9] then
      if ARGV[10] ~= '1' then
        return {{'held_here', 0, ''}}
      end
    elseif holder and redis.call('EXISTS', ARGV[8] .. holder) == 1 then
      return {{'held', 0, ''}}
    end
  end
else
  redis.call('HSET', KEYS[1], 'created_at', ARGV[2], 'request', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
local done = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if redis.call('HEXISTS', KEYS[1], 'cancel_requested_at') == 1 then
  return {{'cancel', done, ''}}
end
if done >= tonumber(ARGV[6]) then
  return {{'exhausted', done, ''}}
end
-- A backstop for a job whose worker dies before it starts generating (so no attempt is counted).
if redis.call('HINCRBY', KEYS[1], 'deliveries', 1) > 3 * tonumber(ARGV[6]) then
  return {{'undeliverable', done, ''}}
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '')
if seq and state == 'queued' then
  stop_waiting()
  local taken = redis.call('HGET', KEYS[1], 'k_taken')  -- (absent from a record enqueued before it was kept)
  if taken and seq > tonumber(redis.call('GET', taken) or '0') then
    redis.call('SET', taken, seq)
  end
end
local batch = batch_move(state, 'running')
if batch then
  redis.call('HSETNX', batch, 'first_started_at', ARGV[2])
end
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[2], 'worker', ARGV[1], 'holder', ARGV[9])
redis.call('DEL', KEYS[2])  -- chunks of an earlier attempt: this one streams from the start
redis.call('PUBLISH', ARGV[5], cjson.encode({{event='state', state='running', attempts=done}}))
webhook_event(KEYS[1], 'job', ARGV[7], 'start')
return {{'run', done, redis.call('HGET', KEYS[1], 'created_at')}}
"""

# KEYS: record. ARGV: holder. A running job that this worker process starts to generate: one more attempt
# (attempts count the times a worker began generating a job, not the times it held it).
GENERATING_SCRIPT = """
if redis.call('HGET', KEYS[1], 'state') == 'running' and redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then
  return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
end
return 0
"""

# A running job back to queued, its message back on its queue: numbered ``seq`` (when given) in its
# queue's waiting set, so that the sweeper finds it should its message be lost again (worker/serving/sweeper.py).
REQUEUE_LUA = _BATCH_MOVE + """
local function requeue(seq, channel)
  batch_move('running', 'queued')
  redis.call('HSET', KEYS[1], 'state', 'queued')
  local waiting = redis.call('HGET', KEYS[1], 'k_waiting')
  if waiting and seq then
    redis.call('HSET', KEYS[1], 'seq', seq)
    redis.call('ZADD', waiting, seq, redis.call('HGET', KEYS[1], 'job_id'))
  end
  redis.call('HDEL', KEYS[1], 'started_at', 'worker', 'holder')
  redis.call('PUBLISH', channel, cjson.encode({event='state', state='queued'}))
end
"""

# KEYS: record. ARGV: holder, channel. A job its worker took but did not start (the worker is
# stopping): back to queued (it was never charged an attempt), unless it has ended or another worker
# took it. Its message goes back to the far end of its queue: it waits there, numbered as the last.
RELEASE_SCRIPT = REQUEUE_LUA + """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'holder') ~= ARGV[1] then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'deliveries', -1)
local sequence = redis.call('HGET', KEYS[1], 'k_sequence')
requeue(sequence and redis.call('INCR', sequence), ARGV[2])
return 1
"""

# Writes a final state: the record, its expiry, the end event on the chunks stream (when the job
# streamed) and on the channel. The caller has checked that the record is not final yet.
_FINALIZE = _BATCH_MOVE + """
local function finalize(state, now, ttl, field, payload, channel, end_event, streaming)
  batch_move(redis.call('HGET', KEYS[1], 'state'), state)
  stop_waiting()
  redis.call('HSET', KEYS[1], 'state', state, 'finished_at', now)
  if field ~= '' then
    redis.call('HSET', KEYS[1], field, payload)
  end
  redis.call('EXPIRE', KEYS[1], ttl)
  if streaming or redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('XADD', KEYS[2], '*', 'event', end_event)
    redis.call('EXPIRE', KEYS[2], ttl)
  end
  redis.call('PUBLISH', channel, end_event)
  local job_id = redis.call('HGET', KEYS[1], 'job_id') or ''
  if state == 'succeeded' then
    webhook_event(KEYS[1], 'job', job_id, 'output')
  end
  webhook_event(KEYS[1], 'job', job_id, 'completed')
end
"""

# KEYS: record. ARGV: job id. A streaming job's new text, for a webhook that asked for output events
# (the publisher calls it at most every OUTPUT_EVENT_EVERY_S per job); nothing once the job has ended.
# Returns 0 when the job's webhook does not want output events (the publisher then stops asking).
OUTPUT_EVENT_SCRIPT = EVENTS_LUA + """
local events = ',' .. (redis.call('HGET', KEYS[1], 'webhook_events') or '') .. ','
if not redis.call('HGET', KEYS[1], 'webhook') or not string.find(events, ',output,', 1, true) then
  return 0
end
if redis.call('HGET', KEYS[1], 'state') == 'running' then
  webhook_event(KEYS[1], 'job', ARGV[1], 'output')
end
return 1
"""
OUTPUT_EVENT_EVERY_S = 0.5

# KEYS: record, chunks. ARGV: state, now, ttl, field name ('result', 'error' or ''), JSON, channel,
# request JSON or '', end event JSON, '1' for a streaming job. Returns 'ok', or the final state
# already there.
FINISH_SCRIPT = _FINALIZE + f"""
local final = {_FINAL}
local state = redis.call('HGET', KEYS[1], 'state')
if state and final[state] then
  return state
end
if ARGV[7] ~= '' and not state then
  redis.call('HSET', KEYS[1], 'request', ARGV[7], 'created_at', ARGV[2], 'attempts', 0)
end
finalize(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[8], ARGV[9] == '1')
return 'ok'
"""

# KEYS: record, chunks. ARGV: now, ttl, channel, end event JSON, error JSON, cancel channel, job id.
# A queued job ends cancelled here; a running one is flagged and its worker told on the cancel
# channel (it stops at its next decoding step). Returns 'missing', 'final:<state>', 'cancelled' or
# 'requested'.
CANCEL_SCRIPT = _FINALIZE + f"""
local final = {_FINAL}
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 'missing'
end
if final[state] then
  return 'final:' .. state
end
redis.call('HSET', KEYS[1], 'cancel_requested_at', ARGV[1])
if state == 'queued' then
  local ok, request = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'request') or '')
  local streaming = ok and type(request) == 'table' and request['stream'] == true
  finalize('cancelled', ARGV[1], ARGV[2], 'error', ARGV[5], ARGV[3], ARGV[4], streaming)
  return 'cancelled'
end
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 'requested'
"""

# KEYS: record. ARGV: now, ttl, error JSON, channel, end event JSON, stand-in request JSON. A job a
# worker could not even read the message of: failed, if it has no record; an existing record (maybe
# another job's, named by a forged message) is left alone. Returns 1 if it wrote.
FAIL_IF_ABSENT_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'failed', 'created_at', ARGV[1], 'finished_at', ARGV[1], 'attempts', 0, 'request', ARGV[6], 'error', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# KEYS: record, queue. ARGV: message, now, least seconds between two resends. The sweeper's resend of
# a job whose message was lost: only if it still waits, behind a started job or on an empty queue
# (checked by the caller), and was not resent within the gap. Returns 1 if sent.
RESEND_SCRIPT = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then
  return 0
end
local waiting = redis.call('HGET', KEYS[1], 'k_waiting')
if not waiting or not redis.call('ZSCORE', waiting, redis.call('HGET', KEYS[1], 'job_id')) then
  return 0
end
local last = tonumber(redis.call('HGET', KEYS[1], 'resent_at') or '0')
if tonumber(ARGV[2]) - last < tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], 'resent_at', ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""

# A streaming job holds at most one chunk per generated token per sequence, plus its end event; the
# cap only guards against a runaway writer.
STREAM_MAX_ENTRIES = 10 * 2048 + 1


def canonical_json(value: Any) -> str:
    """The one serialisation used for stored requests, so equal requests compare equal as strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def now() -> float:
    return round(time.time(), 6)


@dataclass(frozen=True)
class StartOutcome:
    outcome: str  # 'run' | 'final:<state>' | 'mismatch' | 'exhausted' | 'undeliverable' | 'cancel'
    attempts: int  # times a worker began generating the job before this delivery
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
        cancel_requested_at=number("cancel_requested_at"),
        request=json.loads(data["request"]) if data.get("request") else None,
        batch_id=data.get("batch_id") or None,
        custom_id=data.get("custom_id") or None,
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


def cancel_call(job_id: str, result_ttl_s: int) -> dict[str, list]:
    """CANCEL_SCRIPT's keys and arguments (the sync store and the async client run the same call)."""
    error = cancelled_before_start(job_id)
    return {
        "keys": [keys.job(job_id), keys.job_chunks(job_id)],
        "args": [now(), result_ttl_s, keys.job_channel(job_id), end_event(job_id, JobState.CANCELLED, error=error),
                 error.model_dump_json(), keys.CANCEL_CHANNEL, job_id],
    }


def cancel_outcome(job_id: str, outcome: str) -> CancelOutcome:
    if outcome == "missing":
        raise JobNotFoundError(job_id)
    return CancelOutcome(outcome)


@dataclass(frozen=True)
class CancelOutcome:
    outcome: str  # 'cancelled' | 'requested' | 'final:<state>'

    @property
    def description(self) -> str:
        if self.outcome == "cancelled":
            return "cancelled before it started"
        if self.outcome == "requested":
            return "cancellation requested: the job stops at its next decoding step and keeps its partial text"
        return f"already {self.outcome.removeprefix('final:')}; nothing to cancel"


class JobStore:
    """Record transitions against a synchronous ``redis.Redis`` (decode_responses=True)."""

    def __init__(self, redis, *, result_ttl_s: int, pending_ttl_s: int):
        self.redis = redis
        self.result_ttl_s = result_ttl_s
        self.pending_ttl_s = pending_ttl_s
        self._create = redis.register_script(CREATE_SCRIPT)
        self._start = redis.register_script(START_SCRIPT)
        self._finish = redis.register_script(FINISH_SCRIPT)
        self._cancel = redis.register_script(CANCEL_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)
        self._fail_if_absent = redis.register_script(FAIL_IF_ABSENT_SCRIPT)
        self._generating = redis.register_script(GENERATING_SCRIPT)

    def create(self, job_id: str, request_json: str) -> None:
        self._create(keys=[keys.job(job_id)], args=[request_json, now(), self.pending_ttl_s])

    def get(self, job_id: str) -> JobRecord | None:
        return record_from_hash(job_id, self.redis.hgetall(keys.job(job_id)))

    def start(self, job_id: str, *, worker: str, request_json: str, max_attempts: int, holder: str | None = None,
              take_over: bool = False) -> StartOutcome:
        """``worker``: the node name shown in the record; ``holder``: this process's incarnation
        (default: the node name), whose liveness key says whether a job it holds may be taken over."""
        started = now()
        outcome, attempts, created_at = self._start(
            keys=[keys.job(job_id), keys.job_chunks(job_id)],
            args=[worker, started, self.pending_ttl_s, request_json, keys.job_channel(job_id), max_attempts, job_id, keys.worker_alive(""),
                  holder or worker, "1" if take_over else ""],
        )
        return StartOutcome(outcome, int(attempts), max(0.0, started - float(created_at)) if created_at else 0.0)

    def generating(self, job_ids: list[str], *, holder: str) -> None:
        """These jobs start generating on this worker: one more attempt each (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            self._generating(keys=[keys.job(job_id)], args=[holder], client=pipe)
        pipe.execute()

    def fail_if_absent(self, job_id: str, error: JobError) -> bool:
        """Fail a job whose message could not be read, unless it has a record (which is left alone)."""
        return bool(self._fail_if_absent(keys=[keys.job(job_id)], args=[
            now(), self.result_ttl_s, error.model_dump_json(), keys.job_channel(job_id), end_event(job_id, JobState.FAILED, error=error),
            canonical_json({"unreadable_message": True})]))

    def release(self, job_id: str, *, holder: str) -> bool:
        """Give back a job this worker took but will not run (it is stopping): queued again, its
        attempt not counted. False when the record is no longer this worker's running job."""
        return bool(self._release(keys=[keys.job(job_id)], args=[holder, keys.job_channel(job_id)]))

    # ``streaming``: the job asked for stream=true, so its stream gets the end event even if it sent no chunk.

    def succeed(self, job_id: str, result: JobResult, *, streaming: bool = False) -> str:
        return self._finish_with(job_id, JobState.SUCCEEDED, result=result, streaming=streaming)

    def fail(self, job_id: str, error: JobError, *, request_json: str = "", streaming: bool = False) -> str:
        return self._finish_with(job_id, JobState.FAILED, error=error, request_json=request_json, streaming=streaming)

    def expire(self, job_id: str, error: JobError, *, streaming: bool = False) -> str:
        """End a job whose deadline passed before it started."""
        return self._finish_with(job_id, JobState.EXPIRED, error=error, streaming=streaming)

    def finish_cancelled(self, job_id: str, result: JobResult | None = None, *, streaming: bool = False) -> str:
        """End a job whose cancellation was requested: with its partial result, or none if it never ran."""
        error = None if result is not None else cancelled_before_start(job_id)
        return self._finish_with(job_id, JobState.CANCELLED, result=result, error=error, streaming=streaming)

    def cancel(self, job_id: str) -> CancelOutcome:
        return cancel_outcome(job_id, self._cancel(**cancel_call(job_id, self.result_ttl_s)))

    def _finish_with(self, job_id: str, state: JobState, *, result: JobResult | None = None, error: JobError | None = None,
                     request_json: str = "", streaming: bool = False) -> str:
        field, payload = ("result", result.model_dump_json()) if result is not None else ("error", error.model_dump_json())
        return self._finish(
            keys=[keys.job(job_id), keys.job_chunks(job_id)],
            args=[state.value, now(), self.result_ttl_s, field, payload, keys.job_channel(job_id), request_json,
                  end_event(job_id, state, result, error), "1" if streaming else "0"],
        )
