"""The batcher: one thread that owns the model and runs the jobs held by the worker's task threads.

Jobs decoded one token at a time (greedy and sampling) share one continuous decoding batch
(worker/decoding.py): between two steps, finished jobs leave it and waiting jobs join it, so no job
waits for a whole batch to end, and jobs with different parameters decode together. Beam search
jobs run as whole generate() calls, between two steps.

When jobs join
  - An idle batcher starts once no new job has arrived for ``batch_wait_ms``, or its oldest job has
    waited ``batch_max_delay_ms``, or a full batch is waiting: a burst is prefilled together. A
    running batch takes in waiting jobs by the same rule, at its next step.
  - Jobs join in arrival order (jobs set aside after running out of memory first) while the batch
    holds fewer than ``batch_max_size`` jobs and its cost stays within the token budget. The first
    job that does not fit stops the ones behind it, so none is overtaken forever; an empty batch
    always takes its first waiting job.
  - The oldest waiting job decides what runs next: a beam search job runs in one generate() call
    with the waiting jobs that share its generation config (nearest in prompt length, within the
    size, budget and padding limits).

Out of memory
  ``torch.OutOfMemoryError`` is caught at the batch boundary only: a join (prefill), a decoding
  step, or a generate() call. Memory is freed outside the except block, and the cost that failed
  halves the remembered token budget, which grows back slowly after successes.
  - A join that runs out of memory is undone; its jobs wait and join again under the lower budget.
  - A decoding step that runs out of memory is undone, and the jobs that joined last are set aside
    with the tokens they have; they rejoin later (their prompt and tokens are prefilled again, so
    nothing is generated twice), and the step is retried with the rest.
  - A generate() call is split in halves and each half retried.
  A job that runs out of memory alone fails with ``out_of_memory``; no other job is affected, none is
  lost, and none gets two results.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from producer.errors import ErrorCode
from producer.records import StreamChunk
from producer.settings import Settings
from worker.decoding import ActiveJob, DecodeBatch, prefill_groups
from worker.engine import Engine, Generated, PreparedJob, RawSequence, batch_cost
from worker.errors import JobFailure
from worker.metrics import Metrics

log = logging.getLogger("belle.batcher")

PADDING_EFFICIENCY = 0.5  # a generate() call's real tokens / padded tokens may not fall below this
REPORT_EVERY_S = 10.0  # a decoding batch that runs on is summarised in the log this often


@dataclass
class DecodeStats:
    """What the decoding batch did since its last log line."""

    since: float = field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: int = 0
    joined: int = 0
    finished: int = 0
    set_aside: int = 0

    def line(self, jobs: int, budget: int) -> str:
        seconds = time.perf_counter() - self.since
        return (f"decoding: {self.steps} steps, {self.tokens} tokens ({self.tokens / max(seconds, 1e-9):.1f} tokens/s) in {seconds:.3f} s; "
                f"{self.joined} jobs joined, {self.finished} finished, {self.set_aside} set aside (splits); now {jobs} jobs; budget={budget}")


class BatcherStopped(RuntimeError):
    """The worker is shutting down before this job ran; its message should go back to the queue."""


@dataclass(eq=False)
class _Pending:
    job: PreparedJob
    key: tuple | None  # the generate() batch key of a beam search job; None for a stepwise job
    arrived: float
    future: Future = field(default_factory=Future)
    active: ActiveJob | None = None  # a stepwise job set aside after running out of memory: its progress

    @property
    def shape(self) -> tuple[int, int, int]:
        """(rows, longest input, most tokens still to generate) of this job in a decoding batch."""
        if self.active is not None:
            rows = [r for r in self.active.rows if r.finish is None]
            return len(rows), max(len(r.inputs) for r in rows), max(r.remaining for r in rows)
        return self.job.request.num_return_sequences, len(self.job.input_ids), self.job.max_new_tokens


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
    """``publisher`` (``.publish(chunks, then)``: write the chunks, then call ``then``, in order)
    carries streaming jobs' chunks to Redis, and ``cancellations`` (``.is_cancelled(job_id)``) says
    which jobs to stop; without them (in-process use) nothing streams and nothing is cancelled."""

    def __init__(self, engine: Engine | None, settings: Settings, *, publisher=None, cancellations=None, metrics: Metrics | None = None):
        self.engine = engine
        self.publisher = publisher
        self.cancellations = cancellations
        self.metrics = metrics or Metrics()
        self.max_size = settings.batch_max_size
        self.max_prefill_tokens = settings.batch_max_prefill_tokens
        self.stream_interval_s = settings.stream_interval_ms / 1000
        self.wait_s = settings.batch_wait_ms / 1000
        self.max_delay_s = settings.batch_max_delay_ms / 1000
        self.budget = TokenBudget(settings.batch_max_tokens)
        self._pending: list[_Pending] = []
        self._batch: DecodeBatch | None = None  # made on the batcher thread, once the engine is there
        self._in_batch: dict[str, _Pending] = {}  # the running batch's jobs, by id
        self._stats = DecodeStats()
        self._cond = threading.Condition()
        self._stopping = False
        self._load: Callable[[], Engine] | None = None
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="belle-batcher", daemon=True)

    def start(self, load: Callable[[], Engine] | None = None) -> Batcher:
        """Start the batcher thread. With ``load``, the engine is loaded on that thread, the one that
        runs it (torch work on a second long-lived thread makes every later step slower: see
        BENCHMARKS.md), and this returns once it is loaded, or raises what loading raised."""
        self._load = load
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error
        return self

    def drain(self) -> None:
        """Take no more jobs in: those being decoded finish, waiting ones get ``BatcherStopped`` (their
        messages go back to the queue), and the thread ends. Returns at once (a warm shutdown)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """``drain()``, and wait for the thread to end."""
        self.drain()
        self._thread.join(timeout)

    def submit(self, job: PreparedJob) -> Future:
        """Queue a prepared job; the future's result is a ``Generated``, or it raises ``JobFailure``."""
        key = None if Engine.decodes_stepwise(job) else Engine.batch_key(job)
        pending = _Pending(job, key, time.monotonic())
        with self._cond:
            if self._stopping:
                raise BatcherStopped("the batcher is stopping")
            self._pending.append(pending)
            self.metrics.waiting_jobs.set(len(self._pending))
            self._cond.notify_all()
        return pending.future

    def run(self, job: PreparedJob) -> Generated:
        return self.submit(job).result()

    # --- the batcher thread ---

    def _main(self) -> None:
        if self._load is not None:
            try:
                self.engine = self._load()
            except BaseException as exc:
                self._load_error = exc
                self._loaded.set()
                return
        self._loaded.set()
        with torch.inference_mode():
            self._batch = DecodeBatch(self.engine)
            self._loop()

    def _loop(self) -> None:
        while True:
            with self._cond:
                work = self._next_work()
            if work is None:
                return
            kind, items = work
            try:
                if kind == "generate":
                    self._generate(items)
                elif kind == "join":
                    self._join(items)
                if self._decoding:
                    self._step()
            except Exception as exc:  # a bug here must not leave task threads waiting forever
                log.exception("the batcher failed")
                failure = JobFailure(ErrorCode.GENERATION_ERROR, f"the batcher failed: {type(exc).__name__}: {exc}"[:2000])
                for pending in [*items, *self._in_batch.values()]:
                    if not pending.future.done():
                        pending.future.set_exception(failure)
                self._in_batch.clear()
                self._batch = DecodeBatch(self.engine)

    @property
    def _decoding(self) -> bool:
        return self._batch is not None and len(self._batch) > 0

    def _next_work(self) -> tuple[str, list[_Pending]] | None:
        """Wait (holding the condition) until there is work: a generate() call, jobs to join, or a
        decoding step. None once stopped."""
        while True:
            if self._stopping:
                if self._decoding:
                    return "step", []
                for pending in self._pending:
                    pending.future.set_exception(BatcherStopped("the worker is shutting down"))
                self._pending.clear()
                return None
            if self._pending:
                wait = self._until_due()
                if wait <= 0 and (work := self._select()) is not None:
                    return work
                if not self._decoding:
                    self._cond.wait(max(wait, 0.001))
                    continue
            if self._decoding:
                return "step", []
            self._cond.wait()

    def _until_due(self) -> float:
        """Seconds until the waiting jobs should be taken in (≤ 0: now)."""
        first, last = self._pending[0], self._pending[-1]
        room = self.max_size - len(self._batch.jobs)
        if first.active is not None or len(self._pending) >= room:
            return 0.0
        return min(first.arrived + self.max_delay_s, last.arrived + self.wait_s) - time.monotonic()

    def _select(self) -> tuple[str, list[_Pending]] | None:
        anchor = self._pending[0]
        if anchor.key is not None:
            batch = self._select_generate(anchor)
            kind = "generate"
        else:
            batch = self._select_join()
            kind = "join"
        if not batch:
            return None
        taken = {id(p) for p in batch}
        self._pending = [p for p in self._pending if id(p) not in taken]
        self.metrics.waiting_jobs.set(len(self._pending))
        return kind, batch

    def _select_join(self) -> list[_Pending]:
        batch = self._batch
        jobs, rows, width = len(batch.jobs), len(batch), batch.length
        remaining = max((r.remaining for r in batch.rows), default=0)
        joining: list[_Pending] = []
        for pending in self._pending:
            if pending.key is not None:
                continue  # beam search waits for its turn as the oldest job
            if jobs + len(joining) >= self.max_size:
                break
            n, length, left = pending.shape
            cost = (rows + n) * (max(width, length) + max(remaining, left))
            if cost > self.budget.limit and (joining or jobs):
                break
            joining.append(pending)
            rows, width, remaining = rows + n, max(width, length), max(remaining, left)
        return joining

    def _select_generate(self, anchor: _Pending) -> list[_Pending]:
        group = sorted((p for p in self._pending if p.key == anchor.key), key=lambda p: len(p.job.input_ids))
        # The window of max_size jobs (in prompt-length order) that holds the anchor and sits at one
        # end of the group, so that what is left over stays one contiguous run for the next call.
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

    def _requeue(self, items: list[_Pending]) -> None:
        """Put jobs back at the front of the waiting line, in their order."""
        with self._cond:
            self._pending[:0] = items

    def _is_cancelled(self, job_id: str) -> bool:
        return self.cancellations is not None and self.cancellations.is_cancelled(job_id)

    def _publish(self, chunks: list[StreamChunk], outcomes: list[tuple[_Pending, Generated | BaseException]]) -> None:
        """Publish a step's chunks, then resolve these jobs: through the publisher's queue, so that a
        job's record ends (its task thread writes the end event) after all its chunks were written."""
        for pending, _ in outcomes:
            self._in_batch.pop(pending.job.job_id, None)

        def resolve() -> None:
            for pending, outcome in outcomes:
                if pending.future.done():  # failed meanwhile by the batcher's last-resort handler
                    continue
                if isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)

        if self.publisher is None:
            resolve()
        elif chunks or outcomes:
            self.publisher.publish(chunks, then=resolve)

    def _resolve(self, pending: _Pending, outcome: Generated | BaseException) -> None:
        self._publish([], [(pending, outcome)])

    # --- the decoding batch ---

    def _join(self, items: list[_Pending]) -> None:
        engine, batch = self.engine, self._batch
        for pending in items:
            if pending.active is None:
                pending.active = ActiveJob.start(pending.job, engine.decode, engine.device, streaming=pending.job.request.stream and self.publisher is not None,
                                                 stream_interval_s=self.stream_interval_s)
        rows = [r for p in items for r in p.active.live_rows]
        before = len(batch.jobs)
        cost = batch.cost_with(rows)
        groups = prefill_groups(rows, self.max_size, self.max_prefill_tokens)
        started = time.perf_counter()
        error: Exception | None = None
        out_of_memory = False
        try:
            engine.check_memory(cost, f"{len(items)} jobs joining a batch of {before}")
            batch.join(groups)
        except torch.OutOfMemoryError:
            out_of_memory = True
        except Exception as exc:
            error = exc
        else:
            if before == 0:
                self._stats = DecodeStats()
            self._stats.joined += len(items)
            self._in_batch.update((p.job.job_id, p) for p in items)
            self.budget.succeeded(cost)
            self.metrics.joined.observe(len(items))
            self.metrics.decoding_jobs.set(len(batch.jobs))
            self.metrics.token_budget.set(self.budget.limit)
            log.info("batch: %d jobs joined (%d rows, %d prefill calls, %d prompt tokens, %.3f s); now %d jobs, %d rows, %d columns; budget=%d",
                     len(items), len(rows), len(groups), sum(len(r.inputs) for r in rows), time.perf_counter() - started,
                     len(batch.jobs), len(batch), batch.length, self.budget.limit)
            return
        # Here, outside the except block, the exception's frames (and the tensors they hold) are gone.
        if out_of_memory:
            self._free_memory()
            self.budget.failed(cost)
            self.metrics.out_of_memory.labels("join").inc()
            self.metrics.token_budget.set(self.budget.limit)
            if len(items) == 1 and before == 0:
                self._resolve(items[0], self._oom_failure(items[0].job, cost))
                return
            log.warning("out of memory when %d jobs joined a batch of %d (cost %d tokens); they wait; token budget now %d",
                        len(items), before, cost, self.budget.limit)
            self._requeue(items)
            return
        if len(items) == 1:
            log.error("job %s: prefill failed: %s: %s", items[0].job.job_id, type(error).__name__, error)
            self._resolve(items[0], JobFailure(ErrorCode.GENERATION_ERROR, f"generation failed: {type(error).__name__}: {error}"[:2000]))
            return
        log.warning("%d jobs joining raised %s: %s; joining them in halves to isolate the job at fault", len(items), type(error).__name__, error)
        half = len(items) // 2
        self._join(items[:half])
        self._join(items[half:])

    def _step(self) -> None:
        batch = self._batch
        jobs = batch.jobs
        cancelled = []
        for active in jobs:
            active.peak_jobs = max(active.peak_jobs, len(jobs))
            if self._is_cancelled(active.job_id):
                log.info("job %s: cancelled; it stops now with its partial text", active.job_id)
                cancelled += active.live_rows
                active.cancel()
        if cancelled:
            batch.remove(cancelled)
        finished, chunks = [], []
        if len(batch):
            self._stats.steps += 1
            self._stats.tokens += len(batch)
            self.metrics.steps.inc()
            self.metrics.tokens.inc(len(batch))
            self.metrics.step_rows.observe(len(batch))
            finished = batch.choose()
            chunks = list(batch.chunks)
        done = []
        for active in jobs:
            if active.finished:
                generated = self._result(active)
                chunks += generated.final_chunks
                done.append((self._in_batch[active.job_id], generated))
        self._publish(chunks, done)
        self._stats.finished += len(done)
        if finished:
            batch.remove(finished)
        if len(batch):
            self._forward(batch)
        self.metrics.decoding_jobs.set(len(batch.jobs))
        if not len(batch) or time.perf_counter() - self._stats.since >= REPORT_EVERY_S:
            log.info(self._stats.line(len(batch.jobs), self.budget.limit))
            self._stats = DecodeStats()

    def _forward(self, batch: DecodeBatch) -> None:
        """The decoding step's model call; on running out of memory, the jobs that joined last are set
        aside until it fits."""
        while len(batch):
            cost = batch.cost()
            try:
                batch.forward()
                return
            except torch.OutOfMemoryError:
                pass
            self._free_memory()
            self.budget.failed(cost)
            self.metrics.out_of_memory.labels("step").inc()
            self.metrics.token_budget.set(self.budget.limit)
            jobs = batch.jobs
            if len(jobs) == 1:
                batch.remove(jobs[0].live_rows)
                self._resolve(self._in_batch[jobs[0].job_id], self._oom_failure(jobs[0].job, cost))
                return
            aside = jobs[len(jobs) // 2:]
            self._stats.set_aside += len(aside)
            log.warning("out of memory in a decoding step of %d jobs (cost %d tokens): %d jobs set aside with their tokens; token budget now %d",
                        len(jobs), cost, len(aside), self.budget.limit)
            batch.remove([r for a in aside for r in a.live_rows])
            self._requeue([self._in_batch.pop(a.job_id) for a in aside])

    def _free_memory(self) -> None:
        if self._batch is not None and not len(self._batch):
            self._batch.arena.release()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _result(self, active: ActiveJob) -> Generated:
        output_scores = active.job.request.output_scores
        sequences = [RawSequence(r.tokens, r.logprobs if output_scores else None) for r in active.rows]
        return self.engine.job_result(active.job, sequences, generation_s=time.perf_counter() - active.started, batch_size=active.peak_jobs,
                                      cancelled=active.cancelled, stream=active.stream)

    # --- generate() calls (beam search) ---

    def _generate(self, batch: list[_Pending]) -> None:
        jobs = [p.job for p in batch]
        stats = {"splits": 0}
        started = time.perf_counter()
        outcomes = self._run_splitting(jobs, stats)
        self._publish([], [(pending, outcomes[pending.job.job_id]) for pending in batch])
        self.metrics.generate_jobs.observe(len(jobs))
        self.metrics.tokens.inc(sum(o.result.usage.completion_tokens for o in outcomes.values() if isinstance(o, Generated)))
        log.info(
            "generate() batch size=%d tokens=%d (prompt %d, new ≤%d) seconds=%.3f splits=%d budget=%d",
            len(jobs), batch_cost(jobs), sum(len(j.input_ids) for j in jobs), max(j.max_new_tokens for j in jobs),
            time.perf_counter() - started, stats["splits"], self.budget.limit,
        )

    def _run_splitting(self, jobs: list[PreparedJob], stats: dict) -> dict[str, Generated | BaseException]:
        cost = batch_cost(jobs)
        out_of_memory = False
        try:
            generated = self.engine.generate_batch(jobs, self._is_cancelled if self.cancellations is not None else None)
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
            self._free_memory()
            self.budget.failed(cost)
            self.metrics.out_of_memory.labels("generate").inc()
            self.metrics.token_budget.set(self.budget.limit)
            if len(jobs) == 1:
                return {jobs[0].job_id: self._oom_failure(jobs[0], cost)}
            log.warning("out of memory on a batch of %d (cost %d tokens): splitting it; token budget now %d", len(jobs), cost, self.budget.limit)
        stats["splits"] += 1
        half = len(jobs) // 2
        return {**self._run_splitting(jobs[:half], stats), **self._run_splitting(jobs[half:], stats)}

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


def _padding_efficiency(jobs: list[PreparedJob]) -> float:
    width = max(len(j.input_ids) for j in jobs)
    real = sum(len(j.input_ids) + j.max_new_tokens for j in jobs)
    return real / (len(jobs) * (width + max(j.max_new_tokens for j in jobs)))

