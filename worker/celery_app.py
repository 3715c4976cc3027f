"""The worker's Celery app: one task, one message per job, delivery guarantees declared up front."""

from __future__ import annotations

import logging

from celery import Celery, Task, signals
from celery.worker.consumer import Consumer

from producer import keys
from producer.queueing import celery_config
from producer.settings import Settings
from worker.handler import JobHandler
from worker.transport import TRANSPORT


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
    """Celery's consumer, for messages the task never sees: one whose body cannot be read (a pickle,
    bytes that are not UTF-8 JSON) is acknowledged unread, as Celery does, and if it names one of our
    jobs that has no record, that job is failed (``invalid_request``); one for a task name we do not
    serve is logged and rejected (never redelivered). Neither changes an existing record."""

    handler: JobHandler | None = None

    def on_decode_error(self, message, exc):
        super().on_decode_error(message, exc)
        self._unreadable(message, f"the job's message could not be read ({type(exc).__name__}: {str(exc)[:200]}); messages must be JSON (UTF-8)")

    def on_invalid_task(self, body, message, exc):
        super().on_invalid_task(body, message, exc)
        self._unreadable(message, f"the job's message could not be read as a task ({type(exc).__name__}: {str(exc)[:200]}); messages must be JSON (UTF-8)")

    def on_unknown_task(self, body, message, exc):
        log.error("rejected a message for a task this worker does not serve: %.100r (id %.80r)", message.headers.get("task"), message.headers.get("id"))
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def _unreadable(self, message, reason: str) -> None:
        headers = message.headers or {}
        if self.handler is not None and headers.get("task") == keys.TASK_GENERATE and isinstance(headers.get("id"), str):
            self.handler.unreadable(headers["id"], reason)


def create_app(settings: Settings, handler: JobHandler) -> Celery:
    app = Celery("belle-worker", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.update(
        broker_transport=TRANSPORT,
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
