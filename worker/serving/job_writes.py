"""The job record's transitions that only a worker makes: start, generating (an attempt counted), release
(back to queued), fail-if-absent, and the final writes (succeeded, failed, expired, cancelled). Their
scripts are under worker/serving/lua/. The record's layout, reading it and cancelling it are the
client's: producer/store.py.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import redis

from producer import keys
from producer.durability import Durability
from producer.lua import ScriptPipeline
from producer.errors import NotReplicatedError
from producer.records import JobError, JobResult, JobState
from producer.schemas import stored_form
from producer.stream_shards import PAUSE_S, StreamShards
from producer.store import JobStore, cancelled_before_start, canonical_json, end_event, now
from worker.serving.lua import script

log = logging.getLogger("belle.worker")
NOT_REPLICATED_LOG_S = 60.0  # at most one line a minute while replicas do not confirm final states


@dataclass(frozen=True)
class StartOutcome:
    outcome: str  # 'run' | 'final:<state>' | 'mismatch' | 'held' | 'held_here' | 'cancel' | 'exhausted' | 'undeliverable' | 'missing'
    attempts: int  # times a worker began generating the job before this delivery
    queued_s: float = 0.0  # submission to this start
    request_json: str = ""  # the record's request (stored form), when the message carries none

    @property
    def should_run(self) -> bool:
        return self.outcome == "run"


def stored_json_of(request_json: str) -> str:
    """A message's request (canonical JSON) in the form a record stores it; a stand-in (no request) as it is."""
    try:
        request = json.loads(request_json)
    except ValueError:
        return request_json
    return canonical_json(stored_form(request)) if isinstance(request, dict) else request_json


class WorkerJobStore(JobStore):
    """A JobStore that also makes the worker's transitions."""

    def __init__(self, redis, *, result_ttl_s: int, pending_ttl_s: int, bulk_ready_jobs: int = 64, durability: Durability = Durability(),
                 streams: StreamShards | None = None):
        super().__init__(redis, result_ttl_s=result_ttl_s, pending_ttl_s=pending_ttl_s, streams=streams)
        self.bulk_ready_jobs = bulk_ready_jobs  # how long starting a job keeps a fairly shared queue (producer/fairness.py)
        self.durability = durability  # final states wait for replicas (BELLE_WAIT_REPLICAS)
        self.not_replicated = 0  # final states the replicas did not confirm in time
        self._not_replicated_logged = 0.0
        self._start = redis.register_script(script("start"))
        self._generating = redis.register_script(script("generating"))
        self._release = redis.register_script(script("release"))
        self._finish = redis.register_script(script("finish"))
        self._fail_if_absent = redis.register_script(script("fail_if_absent"))

    def start(self, job_id: str, *, worker: str, request_json: str, max_attempts: int, holder: str | None = None,
              take_over: bool = False, stored_json: str = "") -> StartOutcome:
        """``worker``: the node name shown in the record; ``holder``: this process's incarnation
        (default: the node name), whose liveness key says whether a job it holds may be taken over.
        ``request_json``: the message's request (canonical JSON), '' when it carries none (the record's is
        returned); ``stored_json``: the same in its stored form (producer/schemas.py, ``stored_form``; default:
        made from ``request_json``)."""
        started = now()
        if request_json and not stored_json:
            stored_json = stored_json_of(request_json)
        outcome, attempts, created_at, *rest = self._start(
            keys=[keys.job(job_id), keys.job_chunks(job_id)],
            args=[worker, started, self.pending_ttl_s, request_json, "", max_attempts, job_id, keys.worker_alive(""),
                  holder or worker, "1" if take_over else "", self.bulk_ready_jobs, stored_json],
        )
        if outcome == "run" and int(attempts) > 0 and self.streams.sharded:
            self._best_effort(lambda: self.streams.of(job_id).delete(keys.job_chunks(job_id)), job_id, "clearing an earlier attempt's stream")
        return StartOutcome(outcome, int(attempts), max(0.0, started - float(created_at)) if created_at else 0.0, rest[0] if rest else "")

    def _best_effort(self, write, job_id: str, what: str) -> None:
        """A write to a stream shard: as chunks are, best effort (the record holds the whole text; a shard that
        failed a write is left alone a few seconds: producer/stream_shards.py)."""
        if not self.streams.writable(job_id):
            return
        try:
            write()
        except redis.RedisError as exc:
            if self.streams.failed(job_id):
                log.warning("job %s: %s failed (%s); its stream shard is left alone for %g s, readers end from the records", job_id, what, exc, PAUSE_S)

    def generating(self, job_ids: list[str], *, holder: str) -> None:
        """These jobs start generating on this worker: one more attempt each (one round trip)."""
        pipe = ScriptPipeline(self.redis)
        for job_id in job_ids:
            pipe.script(self._generating, [keys.job(job_id)], [holder])
        pipe.execute()

    def fail_if_absent(self, job_id: str, error: JobError) -> bool:
        """Fail a job whose message could not be read, unless it has a record (which is left alone)."""
        return bool(self._final(self._fail_if_absent, f"job {job_id}'s final state (failed) was written", keys=[keys.job(job_id)], args=[
            now(), self.result_ttl_s, error.model_dump_json(), keys.job_channel(job_id), end_event(job_id, JobState.FAILED, error=error),
            canonical_json({"unreadable_message": True})]))

    def release(self, job_id: str, *, holder: str) -> bool:
        """Give back a job this worker took but will not run (it is stopping): queued again, its
        attempt not counted. False when the record is no longer this worker's running job."""
        return bool(self._release(keys=[keys.job(job_id)], args=[holder]))

    # ``streaming``: whether the job asked for stream=true (its stream then gets the end event even if it sent no
    # chunk); None when its request is not known (its stream, if any, is looked for).

    def succeed(self, job_id: str, result: JobResult, *, streaming: bool | None = None) -> str:
        return self._finish_with(job_id, JobState.SUCCEEDED, result=result, streaming=streaming)

    def fail(self, job_id: str, error: JobError, *, request_json: str = "", streaming: bool | None = None) -> str:
        return self._finish_with(job_id, JobState.FAILED, error=error, request_json=request_json, streaming=streaming)

    def expire(self, job_id: str, error: JobError, *, request_json: str = "", streaming: bool | None = None) -> str:
        """End a job whose deadline passed before it started (or whose record expired before it: ``request_json``
        then stands in for its request in the record made)."""
        return self._finish_with(job_id, JobState.EXPIRED, error=error, request_json=request_json, streaming=streaming)

    def finish_cancelled(self, job_id: str, result: JobResult | None = None, *, streaming: bool | None = None) -> str:
        """End a job whose cancellation was requested: with its partial result, or none if it never ran."""
        error = None if result is not None else cancelled_before_start(job_id)
        return self._finish_with(job_id, JobState.CANCELLED, result=result, error=error, streaming=streaming)

    def _finish_with(self, job_id: str, state: JobState, *, result: JobResult | None = None, error: JobError | None = None,
                     request_json: str = "", streaming: bool | None = None) -> str:
        field, payload = ("result", result.model_dump_json()) if result is not None else ("error", error.model_dump_json())
        apart = self.streams.sharded  # (the end event then goes to the job's shard, after the final state)
        event = end_event(job_id, state, result, error)
        outcome = self._final(self._finish, f"job {job_id}'s final state ({state.value}) was written",
                              keys=[keys.job(job_id), keys.job_chunks(job_id)],
                              args=[state.value, now(), self.result_ttl_s, field, payload, keys.job_channel(job_id), request_json,
                                    event, "0" if apart else "" if streaming is None else "1" if streaming else "0"])
        if apart and outcome == "ok" and streaming is not False:
            self._best_effort(lambda: self._end_stream(job_id, event, streaming), job_id, "writing the end of its stream")
        return outcome

    def _end_stream(self, job_id: str, event: str, streaming: bool | None) -> None:
        """The end event on the job's stream, on its shard (``streaming`` None: only if it has a stream)."""
        shard, stream = self.streams.of(job_id), keys.job_chunks(job_id)
        if streaming is None and not shard.exists(stream):
            return
        shard.pipeline(transaction=False).xadd(stream, {"event": event}).expire(stream, self.result_ttl_s).execute()

    def _final(self, script, what: str, **call):
        """A final state's script, waiting for replicas (BELLE_WAIT_REPLICAS) if asked to."""
        try:
            return self.durability.run(self.redis, script, what, **call)
        except NotReplicatedError as exc:
            self._note_not_replicated(exc)
            return exc.replies[0]

    def _note_not_replicated(self, exc: NotReplicatedError) -> None:
        """The final state stands (the job's message is acknowledged): only a failover before the replicas catch
        up would lose it, and the job would then run again."""
        self.not_replicated += 1
        if time.monotonic() - self._not_replicated_logged >= NOT_REPLICATED_LOG_S:
            self._not_replicated_logged = time.monotonic()
            log.warning("%s (%d final states not confirmed so far)", exc, self.not_replicated)
