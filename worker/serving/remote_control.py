"""Celery's remote control on a worker (``celery control`` and ``celery inspect``, Flower's buttons): what a
broadcast on Redis may do to it.

A worker answers only:
  - ``revoke`` and ``terminate`` (``app.control.revoke(job_id, terminate=...)``, Flower's Revoke and
    Terminate): the job is cancelled as ``belle-queue cancel`` cancels it (``JobStore.cancel``,
    producer/lua/cancel.lua): a queued job ends ``cancelled`` at once, a running one stops at its next
    decoding step and keeps its partial output. ``terminate`` and its signal mean no more than that: the
    task's pool thread is never killed, since the batch it waits on decodes other jobs too. A job that has
    ended cancelled joins Celery's revoked ids (``inspect revoked``): a copy of its message that reaches
    the worker is acknowledged unread, and shows REVOKED;
  - read-only inspection (``INSPECTION``: ``ping``, ``active``, ``revoked``...).
Every other command (``shutdown``, ``pool_restart``, ``pool_grow``, ``rate_limit``, ``add_consumer``,
``enable_events``...) is refused with a reply that says so, so that a broadcast on Redis still cannot stop
or change a worker. Whoever can broadcast can write to Redis, and so could cancel a job anyway.
"""

from __future__ import annotations

import functools
import logging

import redis
from celery.utils.functional import maybe_list
from celery.worker import control as celery_control
from celery.worker import state as worker_state
from celery.worker.consumer.control import Control

from producer import keys
from producer.errors import JobNotFoundError
from producer.records import JobState
from producer.store import JobStore

log = logging.getLogger("belle.worker")

# Celery's read-only inspection commands a worker answers (with their aliases), as Celery implements them.
INSPECTION = ("ping", "clock", "active", "dump_active", "reserved", "dump_reserved", "scheduled", "dump_schedule", "revoked", "dump_revoked",
              "registered", "dump_tasks", "active_queues", "query_task")
ANSWERED = ("revoke", "terminate", *INSPECTION)
_LOGGED_REFUSALS_MAX = 64


class RemoteControl(Control):
    """Celery's remote control step (celery.worker.consumer.control), answering only the commands of ``Commands``."""

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        self.box.node.handlers = Commands(c.jobs)


class Commands(dict):
    """Command name → handler(state, **arguments), as kombu's mailbox node calls it; any name not answered
    gets a refusal (kombu would log a KeyError's traceback for an unknown one)."""

    def __init__(self, jobs: JobStore):
        super().__init__({name: celery_control.Panel.data[name] for name in INSPECTION})
        self["revoke"] = functools.partial(revoke, jobs)
        self["terminate"] = functools.partial(terminate, jobs)
        self._logged: set[str] = set()

    def __missing__(self, name: str):
        return functools.partial(self._refuse, name)

    def _refuse(self, name: str, state, **arguments) -> dict[str, str]:
        if name not in self._logged and len(self._logged) < _LOGGED_REFUSALS_MAX:  # once per command: Flower sends enable_events every few seconds
            self._logged.add(name)
            log.warning("refused the remote control command %.60r (and will refuse it again without saying so): a worker answers only %s",
                        name, ", ".join(ANSWERED))
        return {"error": f"{str(name)[:60]!r} refused: a belle worker answers only {', '.join(ANSWERED)}"}


def revoke(jobs: JobStore, state, task_id=None, terminate=False, signal=None, **arguments) -> dict[str, str]:
    """Cancel the named jobs (an id or a list of ids; a job's Celery task id is its job id) as ``belle-queue
    cancel`` does. ``terminate`` and ``signal`` change nothing: see the module's docstring."""
    done, problems = [], []
    for job_id in sorted({str(i) for i in maybe_list(task_id) or []}):
        try:
            done.append(f"job {job_id}: {cancel(jobs, job_id, terminate=bool(terminate))}")
        except (ValueError, JobNotFoundError, redis.RedisError) as exc:
            problems.append(f"job {job_id[:80]}: {exc}")
    if problems:
        return {"error": "; ".join(problems + done)}
    return {"ok": "; ".join(done) or "no job named"}


def terminate(jobs: JobStore, state, signal=None, task_id=None, **arguments) -> dict[str, str]:
    """Celery's ``terminate``: here, as ``revoke``, a cancellation."""
    return revoke(jobs, state, task_id, terminate=True, signal=signal)


def cancel(jobs: JobStore, job_id: str, *, terminate: bool) -> str:
    """Cancel one job; what became of it. ValueError for what is not a job id, JobNotFoundError for a job
    that has no record."""
    if not keys.ID.match(job_id):
        raise ValueError("not a job id")
    try:
        outcome = jobs.cancel(job_id)
    except redis.RedisError as exc:
        log.error("job %s: revoked, but Redis failed while cancelling it (%s); revoke or cancel it again", job_id, exc)
        raise
    if outcome.outcome in ("cancelled", "final:cancelled"):
        worker_state.revoked.add(job_id)  # its record is final: a message of it may be acknowledged unread
    log.info("job %s revoked through Celery's remote control%s: %s", job_id,
             " with terminate (the job is cancelled; no thread or process is killed)" if terminate else "", outcome.description)
    return outcome.description


def check_revoked(jobs: JobStore, job_id: str | None) -> None:
    """Before Celery takes a message as a task: Celery acknowledges a message unread if its id is among the
    revoked ones. An id joins them only once its job has ended cancelled (``cancel``), but a record expires
    (BELLE_RESULT_TTL_S) and an idempotency key can bring the same id back as a new job before Celery forgets
    the id (3 hours): unless the job's record is still a cancelled one, the id leaves the revoked ones, and the
    message is handled as any other."""
    if job_id is None or job_id not in worker_state.revoked:
        return
    try:
        record = jobs.get(job_id)
    except redis.RedisError:
        record = None  # the handler decides, from the record, once Redis answers
    if record is None or record.state is not JobState.CANCELLED:
        worker_state.revoked.discard(job_id)
