"""Out-of-memory recovery: the token budget that remembers what fitted, and what to do with the jobs of a
batch that did not fit.

``torch.OutOfMemoryError`` is caught at the batch boundary only (a join's prefill, a decoding step's token
choice or model call, a generate() call), and memory is freed outside the except block, once the
exception's frames and the tensors they hold are gone. The cost that failed halves the budget, which grows
back slowly after successes.
  - A join that runs out of memory is undone; its jobs wait and join again under the lower budget.
  - A decoding step that runs out of memory is undone, and the jobs that joined last are set aside with
    the tokens they have (``set_aside``); they rejoin later (their prompt and tokens are prefilled again,
    so nothing is generated twice), and the step is retried with the others.
  - A generate() call is split in halves and each half retried (``run_splitting``). A beam job that runs
    out of memory alone beside a decoding batch waits until the batch is empty, and runs then.
A job that runs out of memory alone fails with ``out_of_memory`` (``failure``); no other job is affected,
none is lost, and none gets two results.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence

import torch

from producer.errors import ErrorCode
from worker.errors import JobFailure
from worker.model.engine import Generated, PreparedJob, batch_cost
from worker.serving.metrics import Metrics

log = logging.getLogger("belle.batcher")

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

    @property
    def tight(self) -> bool:
        """Memory ran out recently: the budget has not grown back to its ceiling."""
        return self.limit < self.ceiling


class MemoryRecovery:
    def __init__(self, ceiling: int, metrics: Metrics):
        self.budget = TokenBudget(ceiling)
        self.metrics = metrics

    def succeeded(self, cost: int) -> None:
        self.budget.succeeded(cost)
        self.metrics.token_budget.set(self.budget.limit)

    def ran_out(self, where: str, cost: int, free: Callable[[], None] = lambda: None) -> None:
        """Memory ran out at ``where`` (join, step, generate) running ``cost`` tokens: free what can be
        freed (``free``, then Python's and the device's caches) and lower the budget."""
        free()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.budget.failed(cost)
        self.metrics.out_of_memory.labels(where).inc()
        self.metrics.token_budget.set(self.budget.limit)

    @staticmethod
    def set_aside(jobs_by_join_order: Sequence) -> list:
        """Of a decoding step's jobs (two or more), those set aside: the later-joined half."""
        return list(jobs_by_join_order[len(jobs_by_join_order) // 2:])

    def run_splitting(self, jobs: Sequence[PreparedJob], run: Callable[[Sequence[PreparedJob]], list[Generated]], *, beside_batch: bool,
                      splits: list[int]) -> dict[str, Generated | JobFailure | None]:
        """Outcomes by job id of ``run(jobs)`` (a generate() call), split in halves on running out of memory
        or on an error (to isolate the job at fault). A job that runs out of memory alone fails, or, beside
        a decoding batch (``beside_batch``), gets None: it runs again once the batch is empty. ``splits``
        counts the splits."""
        cost = batch_cost(jobs)
        out_of_memory = False
        try:
            generated = run(jobs)
        except torch.OutOfMemoryError:
            out_of_memory = True
        except Exception as exc:
            if len(jobs) == 1:
                log.exception("job %s: generation failed", jobs[0].job_id)
                return {jobs[0].job_id: generation_failure(exc)}
            log.warning("a batch of %d raised %s: %s; retrying its halves to isolate the job at fault", len(jobs), type(exc).__name__, exc)
        else:
            self.succeeded(cost)
            return {g.job_id: g for g in generated}
        if out_of_memory:  # outside the except block: the exception's frames (and the tensors they hold) are gone
            self.ran_out("generate", cost)
            if len(jobs) == 1:
                return {jobs[0].job_id: None if beside_batch else self.failure(jobs[0], cost)}
            log.warning("out of memory on a batch of %d (cost %d tokens): splitting it; token budget now %d", len(jobs), cost, self.budget.limit)
        splits[0] += 1
        half = len(jobs) // 2
        return {**self.run_splitting(jobs[:half], run, beside_batch=beside_batch, splits=splits),
                **self.run_splitting(jobs[half:], run, beside_batch=beside_batch, splits=splits)}

    @staticmethod
    def failure(job: PreparedJob, cost: int) -> JobFailure:
        """A job that ran out of memory alone."""
        r = job.request
        log.warning("job %s ran out of memory alone (cost %d tokens)", job.job_id, cost)
        return JobFailure(
            ErrorCode.OUT_OF_MEMORY,
            f"out of memory even alone: {len(job.input_ids)} prompt tokens + max_new_tokens={job.max_new_tokens} "
            f"× {max(r.num_beams, r.num_return_sequences)} beams/sequences = {cost} tokens; reduce max_new_tokens, "
            "num_beams or num_return_sequences, shorten the prompt, or use a smaller (or quantised) model",
            parameter="max_new_tokens",
        )


def generation_failure(exc: BaseException) -> JobFailure:
    return JobFailure(ErrorCode.GENERATION_ERROR, f"generation failed: {type(exc).__name__}: {exc}"[:2000])
