"""What happens to one delivered message: check it, start the job's record, run it, finish the record.

Anything can arrive on a queue (what is not a job message is refused before it gets here:
worker/serving/intake.py). A message is acknowledged once its job has a final record, or handed back to its
queue (``Reject``); one that names a job id ends that job in exactly one final state, and one that does
not is logged and dropped. While Redis refuses writes, the record's writes wait (worker/serving/redis_writes.py);
a Redis failure the handler cannot wait out (Redis gone, or the worker stopping while writes are
refused) leaves the message unacknowledged, to be redelivered. Nothing here raises back into Celery
except on purpose (``Reject``: the message goes back to its queue); ``handle`` returns how the delivery
left its job (``JobEnd``), which the task turns into Celery's state (worker/serving/celery_app.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import redis
from celery.exceptions import Reject

from producer import keys
from producer.connection import is_transient, refused_for_good
from producer.errors import ErrorCode, InvalidRequestError
from producer.fleet import can_run, live_workers
from producer.records import JobError, JobState
from producer.schemas import full_form, parse_request
from producer.settings import Settings
from producer.store import canonical_json, cancelled_before_start
from worker.scheduling.batcher import BULK, INTERACTIVE, Batcher, BatcherStopped, DuplicateJob, JobCancelled
from worker.serving.cancellation import CancelWatcher
from worker.model.engine import Engine
from worker.errors import JobFailure
from worker.model.hardware import HardwareProfile
from worker.scheduling.holders import Holds
from worker.serving.job_writes import WorkerJobStore

log = logging.getLogger("belle.worker")

PASS_ON = 10  # times a worker sends back a job its profile refuses while another worker would run it


@dataclass(frozen=True)
class JobEnd:
    """How a delivery left its job, once the job's record is final: its final state, and the error for a
    failed or expired job (a cancelled one's when it never ran)."""

    state: JobState
    error: JobError | None = None


class JobHandler:
    def __init__(self, settings: Settings, store: WorkerJobStore, engine: Engine, batcher: Batcher, cancellations: CancelWatcher,
                 *, profile: HardwareProfile | None = None, holder: str | None = None):
        self.settings = settings
        self.store = store
        self.engine = engine
        self.batcher = batcher
        self.cancellations = cancellations
        self.profile = profile
        self.metrics = batcher.metrics
        self.holder = holder  # this worker process's incarnation (see WorkerJobStore.start)
        self._running_here = Holds()  # jobs this process started (START said 'run'), still handled
        self._in_hand = Holds()  # jobs whose handle() runs, from before their START
        self._running_lock = threading.Lock()
        self._passed_on: dict[str, int] = {}  # job id → times this worker sent it back for another (_pass_on_if_another_runs_it)
        self.returned: set[str] = set()  # jobs a warm shutdown handed back to their queues (run.py sums them up at the end)

    def handle(self, args: tuple, kwargs: dict[str, Any], *, worker: str, queue: str | None = None) -> JobEnd:
        job_id = kwargs["job_id"]  # a well-formed id, the message's own (worker/serving/intake.py)
        # Registered before the record is started: see worker/serving/cancellation.py.
        self.cancellations.register(job_id)
        with self._running_lock:
            self._in_hand.add(job_id)
        try:
            return self._handle(job_id, args, kwargs, worker, queue or keys.QUEUE_INTERACTIVE)
        except redis.RedisError as exc:
            if not refused_for_good(exc):  # not acknowledged: its job has no final record
                log.error("job %s: Redis failed (%s); its message stays unacknowledged and is delivered again", job_id, exc)
                if not is_transient(exc):
                    time.sleep(1.0)  # an error not known to pass: its message comes back, not at once
                raise Reject("redis failed", requeue=True) from None
            # What is under the job's key is not a record of ours (a key of another type, fields that are not ours): Redis will
            # refuse it every time, and delivering the message again would loop for ever. It is acknowledged, and the job failed
            # if that can be written.
            log.error("job %s: Redis refused to handle its record (%s); its message is dropped: check the key %s", job_id, exc, keys.job(job_id))
            error = JobError(code=ErrorCode.GENERATION_ERROR, message=f"Redis refused an operation on the job's record: {exc}"[:2000])
            try:
                self.store.fail(job_id, error)
            except redis.RedisError as again:
                log.error("job %s: its record cannot be failed either (%s)", job_id, again)
            return JobEnd(JobState.FAILED, error)
        finally:
            self.cancellations.unregister(job_id)
            with self._running_lock:
                self._in_hand.release(job_id)

    def in_hand(self) -> set[str]:
        """The jobs whose messages this process handles now, whatever their stage."""
        with self._running_lock:
            return set(self._in_hand)

    def _handle(self, job_id: str, args: tuple, kwargs: dict[str, Any], worker: str, queue: str) -> JobEnd:
        # The producer's messages carry no request: the job's record holds it (start returns it). One that
        # carries its request (an earlier version's) is checked against the record.
        raw = kwargs.get("request")
        request_json = ""
        oversized = 0
        if "request" in kwargs:
            try:
                request_json = canonical_json(raw)
            except (TypeError, ValueError):
                request_json = canonical_json({"unreadable_request": True})
            # An oversized message is neither stored nor read: its record (or a new one) gets a stand-in,
            # which never matches a real job's request, so a forged one cannot touch another job.
            oversized = len(request_json.encode("utf-8")) if len(request_json) > self.settings.max_message_bytes // 4 else 0
            if oversized > self.settings.max_message_bytes:
                request_json = canonical_json({"oversized_request_bytes": oversized})
            else:
                oversized = 0
        start = self.store.start(job_id, worker=worker, request_json=request_json, max_attempts=self.settings.max_attempts, holder=self.holder)
        if start.outcome == "held_here" and job_id not in self._running_here:
            # The record says this process holds the job, yet it runs no such job: the first start's reply
            # was lost (Redis restarted) and the call retried, or its handling ended without a final record.
            start = self.store.start(job_id, worker=worker, request_json=request_json, max_attempts=self.settings.max_attempts,
                                     holder=self.holder, take_over=True)
        if start.request_json:  # the record's, as the producer stored it (anything else fails as an invalid request below)
            try:
                raw = json.loads(start.request_json)
            except ValueError:
                raw = start.request_json
            raw = full_form(raw)
        # Whether the job streams (its stream gets its end event); None when its request is not known here.
        if isinstance(raw, dict):
            streaming = raw.get("stream") is True
        else:
            streaming = False if "request" in kwargs else None
        if start.outcome == "missing":  # (its message names it only: the request was in the record)
            error = JobError(code=ErrorCode.EXPIRED, message=(
                "the job's record expired (BELLE_PENDING_TTL_S) before a worker took its message, and its request with it; submit the job "
                "again (with a new idempotency_key if it had one)"))
            log.warning("job %s: %s", job_id, error.message)
            self.store.expire(job_id, error, request_json=canonical_json({"record_expired": True}))
            self.metrics.jobs.labels("expired", error.code.value).inc()
            return JobEnd(JobState.EXPIRED, error)
        if start.outcome == "mismatch":
            log.error("job %s: the message's request differs from the stored one; message dropped, record untouched", job_id)
            return JobEnd(JobState.FAILED, JobError(code=ErrorCode.INVALID_REQUEST, parameter="request", message=(
                "this message's request differs from the stored request of its job id; the message was dropped and the job's record left as it is")))
        if start.outcome in ("held", "held_here"):
            # A second copy (a resend, or its holder's own message back after the visibility timeout while
            # the job still runs): it goes back to the queue, never dropped, so that some copy of the
            # message outlives the job should its holder die; it is acknowledged once the job has ended.
            self._copy_back("job %s runs on %s; this copy of its message goes back to the queue until it ends", job_id,
                            "this worker" if start.outcome == "held_here" else "a live worker")
        if start.outcome.startswith("final:"):
            log.info("job %s is already %s; duplicate delivery acknowledged", job_id, start.outcome.removeprefix("final:"))
            record = self.store.get(job_id)  # reported as the job ended, not as this copy's own success
            return JobEnd(JobState(start.outcome.removeprefix("final:")), record.error if record is not None else None)
        if start.outcome == "cancel":
            log.info("job %s was cancelled while an earlier attempt ran; it ends cancelled without running again", job_id)
            return self._cancelled_unstarted(job_id, streaming)
        if start.outcome in ("exhausted", "undeliverable"):
            why = (f"the job's worker died while generating it {start.attempts} times (BELLE_MAX_ATTEMPTS), the last time with the job running alone"
                   if start.outcome == "exhausted" else
                   f"the job was delivered {3 * self.settings.max_attempts} times (3 × BELLE_MAX_ATTEMPTS) and its worker died each time before it "
                   "started generating")
            return self._fail(job_id, streaming, JobError(code=ErrorCode.WORKER_LOST, message=f"{why}: the job itself likely kills the worker "
                                                                                           "(check the worker logs: out of host memory, a crash in a kernel)"))
        with self._running_lock:
            self._running_here.add(job_id)
        try:
            return self._run(job_id, args, kwargs, worker, start, raw, streaming, oversized, queue)
        except (Reject, redis.RedisError):
            raise
        except Exception as exc:  # a bug here must not leave the job running with its message acknowledged
            log.exception("job %s: the worker failed while handling it", job_id)
            return self._fail(job_id, streaming, JobError(code=ErrorCode.GENERATION_ERROR, message=f"the worker failed while handling the job: {type(exc).__name__}: {exc}"[:2000]))
        finally:
            with self._running_lock:
                self._running_here.release(job_id)

    def _run(self, job_id: str, args: tuple, kwargs: dict[str, Any], worker: str, start, raw, streaming: bool | None, oversized: int, queue: str) -> JobEnd:
        priority = BULK if queue == keys.QUEUE_BULK else INTERACTIVE
        try:
            problems = [f"unexpected positional arguments {args!r:.100}"] if args else []
            problems += [f"unexpected field {k!r:.60}" for k in kwargs if k not in ("job_id", "request")]
            if problems:
                raise InvalidRequestError.single("message", None, f"malformed job message: {'; '.join(problems)}")
            if oversized:
                raise InvalidRequestError.single("request", None, f"the job's request is {oversized} bytes, more than BELLE_MAX_MESSAGE_BYTES="
                                                                  f"{self.settings.max_message_bytes}; shorten the prompt or messages")
            request = parse_request(raw, settings=self.settings, resolved=True)
            if self.profile is not None:
                try:
                    self.profile.check(request)
                except JobFailure:
                    self._pass_on_if_another_runs_it(job_id, request, worker, queue)
                    raise
            prepared = self.engine.prepare(job_id, request, queued_s=start.queued_s, attempt=start.attempts + 1)
        except InvalidRequestError as exc:
            return self._fail(job_id, streaming, JobError(code=ErrorCode.INVALID_REQUEST, message=str(exc), parameter=exc.parameter))
        except JobFailure as exc:
            return self._fail(job_id, streaming, exc.error)
        with self.batcher.handover(job_id):
            try:
                generated = self.batcher.run(prepared, priority=priority)
            except DuplicateJob:  # as for a held job: this copy waits in the queue until the job has ended
                self._copy_back("job %s is already in this worker's batcher; this copy of its message goes back to the queue", job_id)
            except JobFailure as exc:  # the batcher already isolated the failure to this job
                return self._fail(job_id, streaming, exc.error)
            except JobCancelled:
                log.info("job %s was cancelled while it waited; it ends cancelled without running", job_id)
                return self._cancelled_unstarted(job_id, streaming)
            except BatcherStopped:
                if job_id not in self.returned:  # (a message handed back may come back once more before Celery stops consuming)
                    log.info("job %s: the worker is stopping before it ran; its message goes back to the queue", job_id)
                self.store.release(job_id, holder=self.holder or worker)
                self.returned.add(job_id)
                raise Reject("worker stopping", requeue=True) from None
            ended = time.perf_counter()
            if generated.cancelled:
                log.info("job %s cancelled while running; its partial result is kept", job_id)
                self.store.finish_cancelled(job_id, generated.result, streaming=streaming)
                self.metrics.jobs.labels("cancelled", "").inc()
                outcome = JobEnd(JobState.CANCELLED)
            else:
                self.store.succeed(job_id, generated.result, streaming=streaming)
                self.metrics.jobs.labels("succeeded", "").inc()
                outcome = JobEnd(JobState.SUCCEEDED)
            self.metrics.observe_hops(generated.result.timings, time.perf_counter() - ended)
            return outcome

    def _pass_on_if_another_runs_it(self, job_id: str, request, worker: str, queue: str) -> None:
        """A job this worker's hardware profile refuses goes back to its queue, unrun and uncounted, while another
        live worker on the queue would run it (producer/fleet.py, ``can_run``); at most PASS_ON times from here,
        since this worker may take it again first. Otherwise it fails (the caller raises)."""
        passes = self._passed_on.pop(job_id, 0)
        if passes >= PASS_ON:
            return
        others = sorted(w.name for w in live_workers(self.store.redis) if w.name != worker and can_run(w, request, queue))
        if not others:
            return
        if len(self._passed_on) > 10_000:  # (jobs another worker took and ran are never seen here again)
            self._passed_on.clear()
        self._passed_on[job_id] = passes + 1
        log.info("job %s: this worker's hardware profile refuses it and %s would run it; it goes back to its queue", job_id, ", ".join(others))
        time.sleep(1.0)  # (before the release: the job is numbered on its queue as the message goes back, not a second earlier)
        self.store.release(job_id, holder=self.holder or worker)
        raise Reject("another worker would run the job", requeue=True)

    def unreadable(self, job_id: str, reason: str) -> None:
        """A refused message naming ``job_id`` (well-formed: worker/serving/intake.py, ``named_job``): fail the job if it has no record."""
        try:
            written = self.store.fail_if_absent(job_id, JobError(code=ErrorCode.INVALID_REQUEST, message=reason, parameter="message"))
        except redis.RedisError as exc:
            log.error("job %s: its message was refused, and its record could not be written (%s)", job_id, exc)
            return
        if written:
            log.warning("job %s failed: %s", job_id, reason)
            self.metrics.jobs.labels("failed", ErrorCode.INVALID_REQUEST.value).inc()
        else:
            log.warning("a message naming job %s could not be read (%s); its record is left as it is", job_id, reason)

    @staticmethod
    def _copy_back(message: str, *args) -> NoReturn:
        """Send this copy of a job's message back to the queue: it waits there until the job has ended."""
        log.warning(message, *args)
        time.sleep(1.0)
        raise Reject("another copy of the job's message runs", requeue=True)

    def _cancelled_unstarted(self, job_id: str, streaming: bool | None) -> JobEnd:
        self.store.finish_cancelled(job_id, streaming=streaming)
        self.metrics.jobs.labels("cancelled", ErrorCode.CANCELLED.value).inc()
        return JobEnd(JobState.CANCELLED, cancelled_before_start(job_id))

    def _fail(self, job_id: str, streaming: bool | None, error: JobError) -> JobEnd:
        if error.code is ErrorCode.EXPIRED:
            log.info("job %s expired: %s", job_id, error.message)
            self.store.expire(job_id, error, streaming=streaming)
            self.metrics.jobs.labels("expired", error.code.value).inc()
            return JobEnd(JobState.EXPIRED, error)
        log.info("job %s failed: %s: %s", job_id, error.code, error.message)
        self.store.fail(job_id, error, streaming=streaming)
        self.metrics.jobs.labels("failed", error.code.value).inc()
        return JobEnd(JobState.FAILED, error)
