"""A simulated worker for benchmarks/fleet.py: the real worker process (``run_worker``: the Celery consumer,
the handler and its Lua transitions, the chunk publisher, the announcer, the sweeper) with a stand-in for
the model and its batcher, so that it measures the queue and not the model.

The stand-in decodes the way a GPU does: one step every 1/--tokens-per-s seconds, whatever the batch
holds, every running job (up to BELLE_BATCH_MAX_SIZE) advancing one token per step. It takes waiting
jobs in at each step (the ``generating`` transition first, as the real batcher does), sends streaming
jobs' chunks through the real ``ChunkPublisher`` at the real interval (BELLE_STREAM_INTERVAL_MS, through
the real ``JobStream``), and hands each job a real ``Generated`` whose record the handler writes.
Nothing under producer/ or worker/ is changed: the stand-ins are patched in here, before ``run_worker``
imports them.

Run (benchmarks/fleet.py does): .venv/bin/python -m benchmarks.fleet_worker --redis-url URL --name sim-1@localhost --tokens-per-s 30
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from concurrent.futures import Future
from typing import ClassVar

from producer import keys
from producer.records import (
    FinishReason,
    JobResult,
    PromptFit,
    SequenceResult,
    Timings,
    Usage,
)
from producer.settings import Settings
from worker.model.detokenize import JobStream
from worker.model.engine import Generated, PreparedJob
from worker.model.model_config import ModelConfig
from worker.scheduling.batcher import BatcherStopped, DuplicateJob
from worker.serving.metrics import Metrics

MODEL = ModelConfig(name="stand-in", path="stand-in")
WORDS = "the quick brown fox jumps over the lazy dog 人工智能 计算机".split()


class StandInEngine:
    """What the handler and run_worker use of ``Engine``: ``prepare`` (no tokenizer: a token per 4
    characters of prompt), ``adapters``, ``device``, ``config``."""

    config = MODEL
    adapters: ClassVar[list[str]] = []
    device = "stand-in"

    @classmethod
    def load(cls, config, device="auto", **_) -> StandInEngine:
        return cls()

    def prepare(self, job_id: str, request, queued_s: float = 0.0, attempt: int = 1) -> PreparedJob:
        prompt = request.prompt or "".join(m.content for m in request.messages or [])
        return PreparedJob(job_id, request, [0] * (len(prompt) // 4 + 1), request.max_new_tokens, PromptFit(context_length=2048), queued_s, attempt)


class Running:
    def __init__(self, job: PreparedJob, future: Future, stream: JobStream | None):
        self.job, self.future, self.stream = job, future, stream
        self.tokens = 0
        self.text = ""
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.peak = 0


class StandInBatcher:
    """What the handler and run_worker use of ``Batcher`` (``start``, ``run``, ``handover``, ``drain``,
    ``stop``, ``healthy``, ``engine``, ``metrics``), decoding at a fixed step rate."""

    tokens_per_s = 30.0  # set by main()

    def __init__(self, engine, settings: Settings, *, publisher=None, cancellations=None, metrics: Metrics | None = None, attempts=None):
        self.engine = engine
        self.publisher = publisher
        self.attempts = attempts
        self.metrics = metrics or Metrics()
        self.max_size = settings.batch_max_size
        self.stream_interval_s = settings.stream_interval_ms / 1000
        self._cond = threading.Condition()
        self._waiting: list[tuple[PreparedJob, Future]] = []
        self._held: set[str] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="stand-in-batcher", daemon=True)

    def start(self, load=None) -> StandInBatcher:
        if load is not None:
            self.engine = load()
        self._thread.start()
        return self

    def drain(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        self.drain()
        self._thread.join(timeout)

    def healthy(self, stall_s: float = 600.0) -> bool:
        return self._thread.is_alive()

    def run(self, job: PreparedJob, *, priority: int = 0) -> Generated:
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise BatcherStopped("the batcher is stopping")
            if job.job_id in self._held:
                raise DuplicateJob(job.job_id)
            self._held.add(job.job_id)
            self._waiting.append((job, future))
            self._cond.notify_all()
        return future.result()

    @contextlib.contextmanager
    def handover(self, job_id: str):
        yield

    def _loop(self) -> None:
        running: list[Running] = []
        step_s = 1 / self.tokens_per_s
        next_step = time.monotonic()
        while True:
            with self._cond:
                while not running and not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    for _, future in self._waiting:
                        future.set_exception(BatcherStopped("the worker is shutting down"))
                    self._waiting.clear()
                    if not running:
                        return
                taken, self._waiting = self._waiting[: self.max_size - len(running)], self._waiting[self.max_size - len(running):]
            if taken:
                if self.attempts is not None:
                    self.attempts.starting([job.job_id for job, _ in taken])  # the real ``generating`` transition
                if not running:
                    next_step = time.monotonic()  # an idle batch starts at once
                running += [Running(job, future, JobStream(job.job_id, job.attempt, 1, job.request.stop, self.stream_interval_s)
                                    if job.request.stream and self.publisher is not None else None) for job, future in taken]
            next_step += step_s
            time.sleep(max(0.0, next_step - time.monotonic()))
            next_step = max(next_step, time.monotonic() - step_s)  # a late step does not make later ones catch up
            self._step(running)
            self.metrics.steps.inc()
            self.metrics.tokens.inc(len(running))
            running[:] = [r for r in running if r.tokens < r.job.max_new_tokens]

    def _step(self, running: list[Running]) -> None:
        now = time.perf_counter()
        chunks, done = [], []
        for r in running:
            r.text += " " + WORDS[r.tokens % len(WORDS)]
            r.tokens += 1
            r.peak = max(r.peak, len(running))
            if r.first_token_s is None:
                r.first_token_s = now - r.started
            if r.stream is not None and r.stream.due(now) and (chunk := r.stream.advance(0, r.text, r.tokens, now=now)):
                chunks.append(chunk)
            if r.tokens >= r.job.max_new_tokens:
                generated = self._result(r, now)
                chunks += generated.final_chunks
                done.append((r, generated))
        # As the real batcher settles a step: a streaming job's outcome goes through the publisher's queue,
        # after its chunks; any other job's at once.
        self._hand_over([(r, g) for r, g in done if r.stream is None])
        streamed = [(r, g) for r, g in done if r.stream is not None]
        if chunks or streamed:
            wanting = {r.job.job_id for r in running if r.job.request.webhook is not None and "output" in r.job.request.webhook_events_filter}
            self.publisher.publish(chunks, then=lambda: self._hand_over(streamed), output_events=wanting)

    def _result(self, r: Running, now: float) -> Generated:
        job = r.job
        final = r.stream.advance(0, r.text, r.tokens, final=True) if r.stream is not None else None
        result = JobResult(
            sequences=[SequenceResult(index=0, text=r.text, token_ids=[0] * r.tokens, finish_reason=FinishReason.LENGTH)],
            usage=Usage(prompt_tokens=len(job.input_ids), completion_tokens=r.tokens, total_tokens=len(job.input_ids) + r.tokens),
            timings=Timings(queued_s=round(job.queued_s, 6), generation_s=round(now - r.started, 6), batch_size=r.peak,
                            admission_s=round(r.started - job.prepared_at, 6), first_token_s=round(r.first_token_s, 6)),
            model=MODEL.name, prompt_fit=job.fit)
        return Generated(job.job_id, result, final_chunks=[final] if final else [])

    def _hand_over(self, outcomes) -> None:
        for r, generated in outcomes:
            r.future.set_result(generated)
        with self._cond:
            self._held.difference_update(r.job.job_id for r, _ in outcomes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--tokens-per-s", type=float, default=30.0, help="decoding steps per second (tokens/s of each sequence)")
    args = parser.parse_args()
    import worker.model.engine
    import worker.model.model_config
    import worker.scheduling.batcher
    from worker.serving.run import run_worker

    StandInBatcher.tokens_per_s = args.tokens_per_s
    worker.scheduling.batcher.Batcher = StandInBatcher
    worker.model.engine.Engine = StandInEngine
    worker.model.model_config.load_model_config = lambda ref, settings: MODEL
    # Other settings (BELLE_STREAM_INTERVAL_MS, BELLE_BATCH_MAX_SIZE, ...) come from the environment, as for a real worker.
    settings = Settings(redis_url=args.redis_url, worker_name=args.name, model=MODEL.name, device="cpu")
    return run_worker(settings, queues=list(keys.QUEUES))


if __name__ == "__main__":
    raise SystemExit(main())
