"""Starting a worker process: load the model, then consume jobs with Celery."""

from __future__ import annotations

import logging
import socket

from producer.connection import redis_client
from producer.settings import Settings
from producer.store import JobStore

log = logging.getLogger("belle.worker")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_worker(settings: Settings, *, queues: list[str]) -> int:
    configure_logging(settings.log_level)
    if not settings.model:
        raise SystemExit("error: no model: pass --model or set BELLE_MODEL")
    from worker.batcher import Batcher
    from worker.cancellation import CancelWatcher
    from worker.celery_app import create_app
    from worker.engine import Engine
    from worker.handler import JobHandler
    from worker.model_config import load_model_config
    from worker.publisher import ChunkPublisher

    config = load_model_config(settings.model, settings)
    redis = redis_client(settings.redis_url)
    store = JobStore(redis, result_ttl_s=settings.result_ttl_s, pending_ttl_s=settings.pending_ttl_s)
    cancellations = CancelWatcher(redis).start()
    publisher = ChunkPublisher(redis, ttl_s=settings.pending_ttl_s).start()
    batcher = Batcher(None, settings, publisher=publisher, cancellations=cancellations)
    # The model is loaded on the batcher's thread, the one that runs it (see Batcher.start).
    batcher.start(load=lambda: Engine.load(config, settings.device, fault_memory_budget_tokens=settings.fault_memory_budget_tokens))
    app = create_app(settings, JobHandler(settings, store, batcher.engine, batcher, cancellations))
    name = settings.worker_name or f"belle@{socket.gethostname()}"
    log.info("worker %s serving %s on queues %s; batches of ≤%d jobs, ≤%d tokens; %d jobs held at once",
             name, config.name, ",".join(queues), settings.batch_max_size, settings.batch_max_tokens, settings.worker_concurrency)
    try:
        app.worker_main([
            "worker", f"--hostname={name}", f"--queues={','.join(queues)}", f"--loglevel={settings.log_level}",
            "--without-gossip", "--without-mingle",
        ])
    finally:
        batcher.stop()
        publisher.stop()
        cancellations.stop()
    return 0
