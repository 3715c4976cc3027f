"""Starting a worker process: load the model, then consume jobs with Celery."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from importlib.metadata import PackageNotFoundError, version

from celery.exceptions import Reject

from producer.connection import WORKER_RETRIES, describe_error, redis_client
from producer.durability import Durability
from producer.fleet import WorkerInfo
from producer.settings import Settings
from producer.stream_shards import StreamShards

log = logging.getLogger("belle.worker")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("celery.app.trace").addFilter(_not_a_reject)


def _not_a_reject(record: logging.LogRecord) -> bool:
    """Celery logs every message handed back to its queue (``Reject``) as a warning with the exception's
    traceback (its log policy for a reject): one per held job at a warm shutdown. The handler raises
    ``Reject`` only after logging, in one line, which job goes back and why (a worker stopping, a second
    copy, Redis failing), so Celery's record is dropped; every other record passes, tracebacks of real
    failures included."""
    return not (record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], Reject))


SHARD_TIMEOUT_S = 2.0


def run_worker(settings: Settings, *, queues: list[str]) -> int:
    configure_logging(settings.log_level)
    if not settings.model:
        raise SystemExit("error: no model: pass --model or set BELLE_MODEL (a configs/models name, a YAML file or a checkpoint folder)")
    # Until Celery installs its own handlers, a stop signal ends the process through the clean-up below
    # (its announcement and liveness are withdrawn at once, not left to expire).
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, _stop_starting_worker)
    from celery.signals import worker_shutting_down
    from celery.utils.nodenames import host_format

    from worker.model.engine import Engine
    from worker.model.hardware import load_profile
    from worker.model.model_config import load_model_config
    from worker.scheduling.batcher import Batcher
    from worker.serving.announce import Announcer
    from worker.serving.cancellation import CancelWatcher
    from worker.serving.celery_app import create_app
    from worker.serving.handler import JobHandler
    from worker.serving.job_writes import WorkerJobStore
    from worker.serving.metrics import Metrics
    from worker.serving.publisher import ChunkPublisher
    from worker.serving.redis_writes import AttemptCounter, PatientStore, RedisWrites
    from worker.serving.sweeper import Sweeper
    from worker.serving.transport import TagsInHand

    config = load_model_config(settings.model, settings)
    profile = load_profile(settings.hardware_profile, settings) if settings.hardware_profile else None
    if (problem := redis_problem(settings.redis_url)) is not None:  # before loading the model: fail in a second, in one line
        log.error(problem)
        return 4
    redis = redis_client(settings.redis_url, retries=WORKER_RETRIES)
    metrics = Metrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.metrics_host)
    writes = RedisWrites(metrics)
    # A stream shard out of reach costs its writes (best effort, as chunks are), not seconds of every job's handling.
    streams = StreamShards(redis, settings.stream_redis_urls, lambda url: redis_client(url, retries=1, timeout_s=SHARD_TIMEOUT_S))
    records = WorkerJobStore(redis, result_ttl_s=settings.result_ttl_s, pending_ttl_s=settings.pending_ttl_s,
                             bulk_ready_jobs=settings.bulk_ready_jobs, durability=Durability.of(settings), streams=streams)
    store = PatientStore(records, writes)  # the handler's writes wait while Redis refuses them
    name = host_format(settings.worker_name or "belle@%h")  # %h: the host name, as Celery expands it
    incarnation = f"{name}/{os.getpid()}/{uuid.uuid4().hex[:8]}"  # this process: a restarted worker keeps its name, not this
    with contextlib.ExitStack() as running:  # stopped in the reverse order
        cancellations = CancelWatcher(redis).start()
        running.callback(cancellations.stop)
        publisher = ChunkPublisher(redis, ttl_s=settings.pending_ttl_s, writes=writes, streams=streams).start()
        running.callback(publisher.stop)

        batcher = Batcher(None, settings, publisher=publisher, cancellations=cancellations, metrics=metrics,
                          attempts=AttemptCounter(records, writes, holder=incarnation))
        running.callback(batcher.stop)
        # The model is loaded on the batcher's thread, the one that runs it (see Batcher.start).
        batcher.start(load=lambda: Engine.load(config, settings.device, fault_memory_budget_tokens=settings.fault_memory_budget_tokens))
        engine = batcher.engine
        handler = JobHandler(settings, store, engine, batcher, cancellations, profile=profile, holder=incarnation)
        tags_in_hand = TagsInHand()
        app = create_app(settings, handler, writes=writes, incarnation=incarnation, tags_in_hand=tags_in_hand)

        def shutting_down(**_) -> None:  # a warm shutdown (SIGTERM): the jobs being decoded finish, the others go back to the queue
            writes.stopping.set()
            batcher.drain()

        worker_shutting_down.connect(shutting_down, weak=False)
        announcer = Announcer(redis, WorkerInfo(
            name=name, incarnation=incarnation, host=socket.gethostname(), pid=os.getpid(), version=package_version(), model=config.name,
            adapters=engine.adapters, device=str(engine.device), profile=profile.name if profile else None,
            max_new_tokens=profile.max_new_tokens if profile else None, num_beams=profile.num_beams if profile else None, queues=queues,
            batch_max_size=settings.batch_max_size, concurrency=settings.worker_concurrency, started_at=round(time.time(), 3),
            heartbeat_at=round(time.time(), 3),
        ), healthy=batcher.healthy, writes=writes).start()
        running.callback(announcer.stop)
        sweeper = Sweeper(redis, worker=name, interval_s=settings.lost_message_sweep_s, resend_gap_s=settings.visibility_timeout_s,
                          writes=writes, bulk_ready_jobs=settings.bulk_ready_jobs, incarnation=incarnation, in_hand=handler.in_hand, tags_in_hand=tags_in_hand.snapshot).start()
        running.callback(sweeper.stop)

        def sum_up_returned() -> None:  # once Celery has stopped: one line for the jobs a warm shutdown handed back
            if handler.returned:
                log.info("warm shutdown: returned %d held jobs to their queues", len(handler.returned))

        running.callback(sum_up_returned)
        log.info("worker %s serving %s on queues %s (profile %s); batches of ≤%d jobs, ≤%d tokens; %d jobs held at once; metrics %s",
                 name, config.name, ",".join(queues), profile.name if profile else "none", settings.batch_max_size, settings.batch_max_tokens,
                 settings.worker_concurrency, f"at http://{settings.metrics_host}:{settings.metrics_port}/metrics" if settings.metrics_port else "off")
        app.worker_main([
            "worker", f"--hostname={name}", f"--queues={','.join(queues)}", f"--loglevel={settings.log_level}",
            "--without-gossip", "--without-mingle",
        ])
    return 0


def _stop_starting_worker(number, frame) -> None:
    log.warning("%s while starting: stopping", signal.Signals(number).name)
    raise SystemExit(0)


def redis_problem(url: str) -> str | None:
    import redis

    client = redis_client(url)
    try:
        client.ping()
    except (redis.ConnectionError, redis.ResponseError) as exc:
        return describe_error(exc, url)
    finally:
        client.close()
    return None


def package_version() -> str:
    try:
        return version("belle-queue")
    except PackageNotFoundError:
        return "unknown"
