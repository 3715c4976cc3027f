"""The worker's Celery app: one task, one message per job, delivery guarantees declared up front."""

from __future__ import annotations

import logging

from celery import Celery, Task, signals
from celery.worker.consumer import Consumer
from vine import promise

from producer import keys
from producer.queueing import celery_config
from producer.settings import Settings
from worker.serving.handler import JobHandler
from worker.serving.intake import named_job, task_problem
from worker.serving.redis_writes import RedisWrites
from worker.serving.transport import bound_transport


class GenerateTask(Task):
    """Delivery policy of a generation job (see the README's "Guarantees")."""

    # Acknowledge only after the job's record is final, so a worker that dies mid-job leaves the
    # message to be redelivered; the record's attempt counter stops a poison job (BELLE_MAX_ATTEMPTS).
    acks_late = True
    reject_on_worker_lost = True
    # The handler turns every failure into a failed record itself; Celery never retries on its own.
    max_retries = 0
    ignore_result = True
    # Accept any argument shape: a malformed message must reach the handler, not fail in Celery.
    typing = False


log = logging.getLogger("belle.worker")


class JobConsumer(Consumer):
    """Celery's consumer, serving ``belle.generate`` only, and only messages as the producer writes them
    (worker/serving/intake.py). Any other message (a task of another name, Celery's built-ins included, a
    body of the wrong shape, an ETA, callbacks, a content type other than JSON, anything Celery fails to
    take as a task) is rejected unread and never redelivered; if it names one of our jobs, that job fails
    ``invalid_request`` unless it has a record (an existing record is never changed by it)."""

    handler: JobHandler | None = None

    def create_task_handler(self, promise=promise):
        received = super().create_task_handler(promise)

        def on_task_received(message):
            problem = task_problem(message.headers, message.content_type, message.content_encoding, message.decode)
            if problem is None:
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


def create_app(settings: Settings, handler: JobHandler, *, writes: RedisWrites, incarnation: str | None = None) -> Celery:
    app = Celery("belle-worker", set_as_current=False)
    app.conf.update(celery_config(settings))
    # Task threads acknowledge their own messages (JobConsumer.call_soon_ack): a connection each at most.
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "max_connections": settings.worker_concurrency + 16}
    app.conf.update(
        broker_transport=bound_transport(writes=writes, incarnation=incarnation, on_refused=handler.unreadable),
        # No remote control: a broadcast on Redis (`celery control shutdown`, pool changes) must not be able to stop or change a worker.
        worker_enable_remote_control=False,
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
        worker_consumer=type("BoundJobConsumer", (JobConsumer,), {"handler": handler}),
    )

    @app.task(base=GenerateTask, bind=True, name=keys.TASK_GENERATE)
    def generate(self, *args, **kwargs):
        handler.handle(args, kwargs, worker=self.request.hostname or "unknown", queue=(self.request.delivery_info or {}).get("routing_key"))

    return app
