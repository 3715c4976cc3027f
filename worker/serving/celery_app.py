"""The worker's Celery app: one task, one message per job, delivery guarantees declared up front."""

from __future__ import annotations

import functools
import logging

from celery import Celery, Task, signals
from celery.exceptions import Ignore
from celery.worker.consumer import Consumer
from vine import promise

from producer import keys
from producer.connection import redis_client
from producer.queueing import celery_config
from producer.records import JobState
from producer.redis_url import is_sentinel_url
from producer.settings import Settings
from producer.store import JobStore
from producer.stream_shards import StreamShards
from worker.serving import remote_control
from worker.serving.handler import JobEnd, JobHandler
from worker.serving.intake import named_job, task_problem
from worker.serving.redis_writes import RedisWrites
from worker.serving.transport import TagsInHand, bound_transport


class JobFailed(Exception):
    """What the task raises, once its job's record is final, for a job that failed or expired: Celery (and
    Flower) show the task FAILURE, with ``<code>: <message>`` (the job's error) as its exception."""

    def __init__(self, code: str, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"JobFailed({str(self)!r})"


class GenerateTask(Task):
    """Delivery policy of a generation job (see docs/guarantees.md)."""

    # Acknowledge only after the job's record is final, so a worker that dies mid-job leaves the
    # message to be redelivered; the record's attempt counter stops a poison job (BELLE_MAX_ATTEMPTS).
    acks_late = True
    reject_on_worker_lost = True
    # The handler turns every failure into a failed record itself; Celery never retries on its own.
    max_retries = 0
    ignore_result = True
    # Accept any argument shape: a malformed message must reach the handler, not fail in Celery.
    typing = False
    # Celery's state follows the job's (``report``): a failed or expired job raises JobFailed after its record is final.
    # Such a failure is acknowledged as a success is (the job has ended: never requeued), and logged in one line without
    # a traceback (an expected exception).
    acks_on_failure_or_timeout = True
    throws = (JobFailed,)


def report(task: Task, end: JobEnd) -> None:
    """Give the task the Celery state of its job, whose record is final by now: SUCCESS for a succeeded job
    (the task returns), FAILURE for a failed or expired one (``JobFailed``), REVOKED for a cancelled one
    (whether it ran or not, and however it was cancelled: a ``task-revoked`` event, as Celery sends for a
    task it revokes, then ``Ignore``: the message is acknowledged, and no other end event is sent)."""
    if end.state is JobState.SUCCEEDED:
        return
    if end.state is JobState.CANCELLED:
        if task.app.conf.worker_send_task_events:
            try:
                task.send_event("task-revoked", terminated=False, signum=None, expired=False)
            except Exception as exc:  # an event is not worth the job's acknowledgement
                log.warning("job %s: its task-revoked event could not be sent (%s: %s)", task.request.id, type(exc).__name__, exc)
        signals.task_revoked.send(sender=task, request=task.request, terminated=False, signum=None, expired=False)
        raise Ignore()
    if end.error is None:
        raise JobFailed(end.state.value, f"the job ended {end.state.value}")
    raise JobFailed(end.error.code.value, end.error.message)


log = logging.getLogger("belle.worker")


RECONNECT_FIRST_S, RECONNECT_STEP_S, RECONNECT_MAX_S = 0.2, 0.5, 5.0


class JobConsumer(Consumer):
    """Celery's consumer, serving ``belle.generate`` only, and only messages as the producer writes them
    (worker/serving/intake.py). Any other message (a task of another name, Celery's built-ins included, a
    body of the wrong shape, an ETA, callbacks, a content type other than JSON, anything Celery fails to
    take as a task) is rejected unread and never redelivered; if it names one of our jobs, that job fails
    ``invalid_request`` unless it has a record (an existing record is never changed by it). Its remote
    control answers revoke (a cancel) and inspection only (worker/serving/remote_control.py)."""

    handler: JobHandler | None = None
    jobs: JobStore | None = None  # for the remote control's cancellations, on the consumer's thread (no waiting on Redis)

    class Blueprint(Consumer.Blueprint):
        default_steps = [remote_control.RemoteControl if step == "celery.worker.consumer.control:Control" else step
                         for step in Consumer.Blueprint.default_steps]

    def create_task_handler(self, promise=promise):
        received = super().create_task_handler(promise)

        def on_task_received(message):
            problem = task_problem(message.headers, message.content_type, message.content_encoding, message.decode)
            if problem is None:
                remote_control.check_revoked(self.jobs, named_job(message.headers))
                try:
                    return received(message)
                except self.connection_errors:
                    raise
                except Exception as exc:
                    problem = f"Celery could not take it as a task ({type(exc).__name__}: {str(exc)[:200]})"
            self.refuse(message, problem)

        return on_task_received

    def on_decode_error(self, message, exc):
        self.refuse(message, f"its body could not be read ({type(exc).__name__}: {str(exc)[:200]}); messages must be JSON (UTF-8)")

    def on_invalid_task(self, body, message, exc):
        self.refuse(message, f"it is not a valid task message ({type(exc).__name__}: {str(exc)[:200]})")

    def ensure_connected(self, conn):
        """Reconnect to the broker every 0.2 s, then backing off by 0.5 s up to 5 s, not Celery's 2 s, 4 s, 6 s
        (kombu's defaults): a Redis restart or a Sentinel failover lasts seconds, and the worker should take
        jobs again within a fraction of one once it is over."""
        conn.ensure_connection = functools.partial(conn.ensure_connection, interval_start=RECONNECT_FIRST_S, interval_step=RECONNECT_STEP_S,
                                                   interval_max=RECONNECT_MAX_S)
        return super().ensure_connected(conn)

    def call_soon_ack(self, p, *args, **kwargs):
        """Acknowledge (or reject) on the task's own thread, at once, rather than through the consumer's
        event loop, which waits while Redis refuses to record a message taken off a queue: the jobs
        that end meanwhile free their messages as soon as their records are final. (kombu's Redis
        transport acknowledges from any thread: its own pipeline, and a set of tags done.)"""
        try:
            p(*args, **kwargs)
        except Exception:
            log.exception("acknowledging a message failed")
        return p

    def refuse(self, message, reason: str) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        job_id = named_job(headers)
        log.error("rejected a message (task %.100r, id %.80r): %s", headers.get("task"), headers.get("id"), reason)
        if job_id is not None and self.handler is not None:
            self.handler.unreadable(job_id, f"the job's message was refused: {reason}")
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=None)


def _revoke_store(settings: Settings) -> JobStore:
    """The job store a Celery revoke cancels through (worker/serving/remote_control.py)."""
    redis = redis_client(settings.redis_url)
    return JobStore(redis, result_ttl_s=settings.result_ttl_s, pending_ttl_s=settings.pending_ttl_s,
                    streams=StreamShards(redis, settings.stream_redis_urls, redis_client))


def create_app(settings: Settings, handler: JobHandler, *, writes: RedisWrites, incarnation: str | None = None,
               tags_in_hand: TagsInHand | None = None) -> Celery:
    app = Celery("belle-worker", set_as_current=False)
    app.conf.update(celery_config(settings))
    # Task threads acknowledge their own messages (JobConsumer.call_soon_ack): a connection each at most.
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "max_connections": settings.worker_concurrency + 16}
    app.conf.update(
        broker_transport=bound_transport(writes=writes, incarnation=incarnation, on_refused=handler.unreadable,
                                         sentinel=is_sentinel_url(settings.redis_url), tags_in_hand=tags_in_hand),
        # Remote control answers revoke (a cancel) and inspection only: a broadcast on Redis (`celery control shutdown`, pool
        # changes) must not be able to stop or change a worker (worker/serving/remote_control.py).
        worker_enable_remote_control=True,
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        worker_prefetch_multiplier=settings.prefetch_multiplier,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_queues=None,
        worker_consumer=type("BoundJobConsumer", (JobConsumer,), {
            "handler": handler, "jobs": _revoke_store(settings)}),
    )

    @app.task(base=GenerateTask, bind=True, name=keys.TASK_GENERATE)
    def generate(self, *args, **kwargs):
        report(self, handler.handle(args, kwargs, worker=self.request.hostname or "unknown", queue=(self.request.delivery_info or {}).get("routing_key")))

    return app
