"""The batcher's shared state under many threads at once: submit (with duplicates), handover, cancel,
settle (through the real publisher thread) and a shutdown in the middle, for a bounded time. Every
submission gets exactly one outcome, a job is never held twice at once, and nothing is left behind."""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
import threading
import time
from collections import Counter

from producer.connection import redis_client
from producer.schemas import parse_request
from producer.settings import Settings
from worker.errors import JobFailure
from worker.model.engine import Engine
from worker.model.model_config import ModelConfig
from worker.scheduling.batcher import (
    BULK,
    INTERACTIVE,
    Batcher,
    BatcherStopped,
    DuplicateJob,
    JobCancelled,
)
from worker.serving.publisher import ChunkPublisher

SUBMITTERS = 8
SUBMITTING_S = 6.0
JOB_IDS = [f"j{i}" for i in range(24)]  # few enough that copies of one job meet


class Cancellations:
    def __init__(self):
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._ids

    def toggle(self, job_id: str) -> None:
        with self._lock:
            self._ids.symmetric_difference_update({job_id})


def request(rng: random.Random) -> dict:
    kind = rng.choice(["greedy", "greedy", "sample", "beam", "stream", "late"])
    base = {"prompt": rng.choice(["Hi", "你好", "What is machine learning?", "Beam search keeps"]), "max_new_tokens": rng.randint(1, 6)}
    return base | {
        "greedy": {"num_beams": 1},
        "sample": {"num_beams": 1, "do_sample": True, "seed": rng.randint(0, 9)},
        "beam": {"num_beams": 2, "num_return_sequences": 2},
        "stream": {"num_beams": 1, "stream": True},
        "late": {"num_beams": 1, "deadline": time.time() - 1},
    }[kind]


def test_submit_handover_cancel_settle_and_shutdown_from_many_threads(tiny_bloom, redis_server, caplog):
    caplog.set_level(logging.ERROR, logger="belle.batcher")
    engine = Engine.load(ModelConfig(name="tiny", path=str(tiny_bloom), context_length=512), "cpu")
    redis = redis_client(redis_server.url)
    publisher = ChunkPublisher(redis, ttl_s=60).start()
    cancellations = Cancellations()
    settings = Settings(batch_wait_ms=1, batch_max_delay_ms=5, batch_max_size=8, max_attempts=3)
    batcher = Batcher(engine, settings, publisher=publisher, cancellations=cancellations).start()
    outcomes: Counter = Counter()
    futures: dict[str, list] = {job_id: [] for job_id in JOB_IDS}  # every accepted submission's future, by job
    problems: list[str] = []
    lock = threading.Lock()
    stop_submitting = threading.Event()

    def submitter(seed: int) -> None:
        rng = random.Random(seed)
        while not stop_submitting.is_set():
            job_id = rng.choice(JOB_IDS)
            job = engine.prepare(job_id, parse_request(request(rng), resolved=True))
            if rng.random() < 0.1:
                job = dataclasses.replace(job, attempt=3)  # its last attempt: runs alone
            with batcher.handover(job_id):
                # Submitted and recorded under one lock, so that the copies of a job are recorded in the order
                # they were accepted: the batcher lets a job go only once its outcome is set, so every earlier
                # copy must be done when a later one is accepted.
                with lock:
                    try:
                        future = batcher.submit(job, priority=rng.choice([INTERACTIVE, BULK]))
                    except (DuplicateJob, BatcherStopped) as exc:
                        outcomes[type(exc).__name__ + " at submit"] += 1
                        continue
                    if any(not earlier.done() for earlier in futures[job_id]):
                        problems.append(f"{job_id} accepted while an earlier copy was held")
                    futures[job_id].append(future)
                try:
                    future.result(timeout=120)
                    kind = "generated"
                except (JobFailure, JobCancelled, BatcherStopped) as exc:
                    kind = type(exc).__name__
                with lock:
                    outcomes[kind] += 1

    def canceller() -> None:
        rng = random.Random(99)
        while not stop_submitting.is_set():
            cancellations.toggle(rng.choice(JOB_IDS))
            stop_submitting.wait(0.002)

    def health() -> None:
        while not stop_submitting.is_set():
            batcher.healthy()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # many more thread switches: the interleavings a busy worker sees
    try:
        threads = [threading.Thread(target=submitter, args=(i,)) for i in range(SUBMITTERS)]
        threads += [threading.Thread(target=canceller), threading.Thread(target=health)]
        for thread in threads:
            thread.start()
        time.sleep(SUBMITTING_S / 2)
        batcher.drain()  # a shutdown while submissions go on
        time.sleep(SUBMITTING_S / 2)
        stop_submitting.set()
        for thread in threads:
            thread.join(180)
        assert not any(thread.is_alive() for thread in threads), "every submission got its outcome"
        batcher.stop(60)
    finally:
        sys.setswitchinterval(interval)
        stop_submitting.set()
        batcher.stop(60)
        publisher.stop()
        redis.close()
    assert not problems, problems[:5]
    assert all(future.done() for held in futures.values() for future in held), "every accepted submission has its outcome"
    assert "settled twice" not in caplog.text and "the batcher failed" not in caplog.text, caplog.text[-2000:]
    assert not batcher._thread.is_alive() and not batcher._held and not batcher.waiting_ids()
    assert outcomes["generated"] and outcomes["BatcherStopped at submit"], outcomes
    print(dict(outcomes))
