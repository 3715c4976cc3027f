"""The batcher: one thread that owns the model and turns the jobs held by the worker's task threads
into batched generate() calls.

Forming a batch
  - An idle batcher starts when no new job has arrived for ``batch_wait_ms``, or when its oldest job
    has waited ``batch_max_delay_ms``, or when a full batch is pending: a burst becomes one batch,
    and a lone interactive job waits only a few milliseconds. Jobs that arrive while a batch runs are
    ready for the next one.
  - The oldest pending job anchors the batch (so no job starves); it is joined by jobs with the same
    batch key (they can share one generate() call): the ``batch_max_size`` jobs nearest in prompt
    length, taken from one end of the group so the rest stays one run of similar lengths, within the
    token budget and a padding limit.

Out of memory
  ``torch.OutOfMemoryError`` is caught at the batch boundary only. The batch is split in halves and
  each half retried; the cost that failed lowers the remembered token budget, which grows back
  slowly after successes. A job that runs out of memory alone fails with ``out_of_memory``; no other
  job is affected, none is lost, and none gets two results (a failed call produced nothing).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from producer.errors import ErrorCode
from producer.settings import Settings
from worker.cancellation import CancelWatcher
from worker.engine import Engine, Generated, PreparedJob, batch_cost
from worker.errors import JobFailure
from worker.publisher import ChunkPublisher
from worker.streaming import JobStream, StepHooks

log = logging.getLogger("belle.batcher")

PADDING_EFFICIENCY = 0.5  # a batch's real tokens / padded tokens may not fall below this


class BatcherStopped(RuntimeError):
    """The worker is shutting down before this job ran; its message should go back to the queue."""


@dataclass
class _Pending:
    job: PreparedJob
    key: tuple
    arrived: float
    future: Future = field(default_factory=Future)


class TokenBudget:
    """The largest batch cost believed to fit in memory: lowered on OOM, grown back slowly."""

    GROW_AFTER = 20  # successful batches before the budget grows
    GROW_BY = 1.25

    def __init__(self, ceiling: int):
        self.ceiling = ceiling
        self.limit = ceiling
        self._successes = 0

    def failed(self, cost: int) -> None:
        self.limit = max(1, min(self.limit, cost // 2))
        self._successes = 0

    def succeeded(self, cost: int) -> None:
        if self.limit >= self.ceiling:
            return
        self._successes += 1
        if self._successes >= self.GROW_AFTER:
            self.limit = min(self.ceiling, int(self.limit * self.GROW_BY) + 1)
            self._successes = 0
            log.info("token budget grows back to %d", self.limit)


class Batcher:
    """``publisher`` carries streaming jobs' chunks to Redis and ``cancellations`` says which jobs to
    stop; without them (in-process use) nothing streams and nothing is cancelled."""

    def __init__(self, engine: Engine, settings: Settings, *, publisher: ChunkPublisher | None = None, cancellations: CancelWatcher | None = None):
        self.engine = engine
        self.publisher = publisher
        self.cancellations = cancellations
        self.max_size = settings.batch_max_size
        self.wait_s = settings.batch_wait_ms / 1000
        self.max_delay_s = settings.batch_max_delay_ms / 1000
        self.budget = TokenBudget(settings.batch_max_tokens)
        self._pending: list[_Pending] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="belle-batcher", daemon=True)

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish the batch in progress, then stop; jobs still pending get ``BatcherStopped``."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def submit(self, job: PreparedJob) -> Future:
        """Queue a prepared job; the future's result is a ``Generated``, or it raises ``JobFailure``."""
        pending = _Pending(job, self.engine.batch_key(job), time.monotonic())
        with self._cond:
            if self._stopping:
                raise BatcherStopped("the batcher is stopping")
            self._pending.append(pending)
            self._cond.notify_all()
        return pending.future

    def run(self, job: PreparedJob) -> Generated:
        return self.submit(job).result()

    # --- the batcher thread ---

    def _loop(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                if batch is None:
                    for pending in self._pending:
                        pending.future.set_exception(BatcherStopped("the worker is shutting down"))
                    self._pending.clear()
                    return
            try:
                self._execute(batch)
            except Exception as exc:  # a bug here must not leave task threads waiting forever
                log.exception("the batcher failed on a batch of %d", len(batch))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(JobFailure(ErrorCode.GENERATION_ERROR, f"the batcher failed: {type(exc).__name__}: {exc}"[:2000]))

    def _next_batch(self) -> list[_Pending] | None:
        """Wait (holding the condition) until a batch is due, then take it out of the pending list."""
        while not self._pending:
            if self._stopping:
                return None
            self._cond.wait()
        while len(self._pending) < self.max_size and not self._stopping:
            now = time.monotonic()
            due = min(self._pending[0].arrived + self.max_delay_s, self._pending[-1].arrived + self.wait_s)
            if now >= due:
                break
            self._cond.wait(due - now)
        batch = self._select()
        taken = {id(p) for p in batch}
        self._pending = [p for p in self._pending if id(p) not in taken]
        return batch

    def _select(self) -> list[_Pending]:
        anchor = self._pending[0]
        group = sorted((p for p in self._pending if p.key == anchor.key), key=lambda p: len(p.job.input_ids))
        # The window of max_size jobs (in prompt-length order) that holds the anchor and sits at one
        # end of the group, so that what is left over stays one contiguous run for the next batch.
        at = group.index(anchor)
        start = 0 if at < self.max_size else max(0, len(group) - self.max_size)
        window = group[start:start + self.max_size]
        # Then trim from the side farther from the anchor until the budget and padding rules hold.
        batch = [anchor]
        for candidate in sorted(window, key=lambda p: abs(len(p.job.input_ids) - len(anchor.job.input_ids))):
            if candidate is anchor:
                continue
            trial = [p.job for p in batch] + [candidate.job]
            if batch_cost(trial) <= self.budget.limit and _padding_efficiency(trial) >= PADDING_EFFICIENCY:
                batch.append(candidate)
        return batch

    def _hooks(self, jobs: list[PreparedJob]) -> StepHooks | None:
        if self.publisher is None and self.cancellations is None:
            return None
        streams = {}
        if self.publisher is not None:
            streams = {j.job_id: JobStream(j.job_id, j.attempt, j.request.num_return_sequences, j.request.stop) for j in jobs if j.request.stream}
        return StepHooks(
            publish=self.publisher.publish if self.publisher is not None else _publish_nowhere,
            is_cancelled=self.cancellations.is_cancelled if self.cancellations is not None else _never_cancelled,
            streams=streams,
        )

    def _execute(self, batch: list[_Pending]) -> None:
        jobs = [p.job for p in batch]
        stats = {"splits": 0}
        started = time.perf_counter()
        outcomes = self._run_splitting(jobs, stats, self._hooks(jobs))
        for pending in batch:
            outcome = outcomes[pending.job.job_id]
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
        log.info(
            "batch size=%d tokens=%d (prompt %d, new ≤%d) seconds=%.3f splits=%d budget=%d",
            len(jobs), batch_cost(jobs), sum(len(j.input_ids) for j in jobs), max(j.max_new_tokens for j in jobs),
            time.perf_counter() - started, stats["splits"], self.budget.limit,
        )

    def _run_splitting(self, jobs: list[PreparedJob], stats: dict, hooks: StepHooks | None) -> dict[str, Generated | BaseException]:
        cost = batch_cost(jobs)
        out_of_memory = False
        try:
            generated = self.engine.generate_batch(jobs, hooks)
        except torch.OutOfMemoryError:
            out_of_memory = True
        except Exception as exc:
            if len(jobs) == 1:
                log.exception("job %s: generation failed", jobs[0].job_id)
                return {jobs[0].job_id: JobFailure(ErrorCode.GENERATION_ERROR, f"generation failed: {type(exc).__name__}: {exc}"[:2000])}
            log.warning("a batch of %d raised %s: %s; retrying its halves to isolate the job at fault", len(jobs), type(exc).__name__, exc)
        else:
            self.budget.succeeded(cost)
            return {g.job_id: g for g in generated}
        # Outside the except block, so the exception's frames (and the tensors they hold) are gone.
        if out_of_memory:
            _free_memory()
            self.budget.failed(cost)
            if len(jobs) == 1:
                return {jobs[0].job_id: self._oom_failure(jobs[0], cost)}
            log.warning("out of memory on a batch of %d (cost %d tokens): splitting it; token budget now %d", len(jobs), cost, self.budget.limit)
        stats["splits"] += 1
        half = len(jobs) // 2
        return {**self._run_splitting(jobs[:half], stats, hooks), **self._run_splitting(jobs[half:], stats, hooks)}

    def _oom_failure(self, job: PreparedJob, cost: int) -> JobFailure:
        r = job.request
        log.warning("job %s ran out of memory alone (cost %d tokens)", job.job_id, cost)
        return JobFailure(
            ErrorCode.OUT_OF_MEMORY,
            f"out of memory even alone: {len(job.input_ids)} prompt tokens + max_new_tokens={job.max_new_tokens} "
            f"× {max(r.num_beams, r.num_return_sequences)} beams/sequences = {cost} tokens; reduce max_new_tokens, "
            "num_beams or num_return_sequences, shorten the prompt, or use a smaller (or quantised) model",
            parameter="max_new_tokens",
        )


def _publish_nowhere(chunks: list) -> None:
    pass


def _never_cancelled(job_id: str) -> bool:
    return False


def _padding_efficiency(jobs: list[PreparedJob]) -> float:
    width = max(len(j.input_ids) for j in jobs)
    real = sum(len(j.input_ids) + j.max_new_tokens for j in jobs)
    return real / (len(jobs) * (width + max(j.max_new_tokens for j in jobs)))


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
