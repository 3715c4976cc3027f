"""The worker's Celery app: one task, one message per job, delivery guarantees declared up front."""

from __future__ import annotations

from celery import Celery, Task

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
    )

    @app.task(base=GenerateTask, bind=True, name=keys.TASK_GENERATE)
    def generate(self, *args, **kwargs):
        handler.handle(args, kwargs, worker=self.request.hostname or "unknown", queue=(self.request.delivery_info or {}).get("routing_key"))

    return app
