"""The batcher: one thread that owns the model and runs the jobs held by the worker's task threads.

Jobs decoded one token at a time (greedy and sampling) share one continuous decoding batch
(worker/model/decoding.py): between two steps, finished jobs leave it and waiting jobs join it, so no job
waits for a whole batch to end, and jobs with different parameters decode together. Beam search
jobs run as whole generate() calls, between two steps.

When jobs join
  - Waiting jobs are kept in order: interactive jobs before bulk ones (the queue a job came from),
    then by arrival; jobs set aside after running out of memory go first of all.
  - An idle batcher starts once no new job has arrived for ``batch_wait_ms``, or its first waiting
    job has waited ``batch_max_delay_ms``, or a full batch is waiting: a burst is prefilled together.
    A running batch takes in waiting jobs by the same rule, at its next step.
  - Jobs join in that order while the batch holds fewer than ``batch_max_size`` jobs (interactive
    jobs may take it a quarter over) and its cost stays within the token budget. The first job that
    does not fit stops the ones behind it, so none is overtaken forever; an empty batch always takes
    its first waiting job. A job cancelled or past its deadline while it waited ends there.
  - When the first waiting job is a beam search job, it runs in one generate() call with the waiting
    jobs that share its generation config (nearest in prompt length, within the size, budget and
    padding limits).

Out of memory
  ``torch.OutOfMemoryError`` is caught at the batch boundary only: a join (prefill), a decoding
  step (choosing tokens, or the model call), or a generate() call. Memory is freed outside the
  except block, and the cost that failed halves the remembered token budget, which grows back slowly
  after successes.
  - A join that runs out of memory is undone; its jobs wait and join again under the lower budget.
  - A decoding step that runs out of memory is undone, and the jobs that joined last are set aside
    with the tokens they have; they rejoin later (their prompt and tokens are prefilled again, so
    nothing is generated twice), and the step is retried with the others.
  - A generate() call is split in halves and each half retried. A beam job that runs out of memory
    alone beside a decoding batch waits until the batch is empty, and runs then.
  A job that runs out of memory alone fails with ``out_of_memory``; no other job is affected, none is
  lost, and none gets two results.

Every outcome goes back to its task thread through the publisher's queue, after the chunks published
before it, so a job's stream always ends after its last chunk.

A job on its last attempt (its worker died while generating it before) runs alone, once the decoding
batch is empty and the outcomes before it are recorded (``Batcher.handover``): should the worker die
again, it is the one charged.

Threads and state
  Task threads call ``submit``, ``run`` and ``handover``; the announcer calls ``healthy``; the worker's
  shutdown calls ``drain``. What they share with the batcher thread is guarded by one lock, the
  condition ``_cond``: the waiting jobs (``_pending``), the jobs held and not yet settled (``_held``,
  by id: a second copy of a job is refused while the first is held), the jobs whose task records an
  outcome (``_tracked``, ``_handovers``) and ``_stopping``. Everything else (the decoding batch, its
  jobs by id ``_in_batch``, the budget, the statistics) belongs to the batcher thread alone.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from producer.errors import ErrorCode
from producer.records import StreamChunk
from producer.settings import Settings
from worker.model.decoding import ActiveJob, DecodeBatch, prefill_groups
from worker.model.engine import Engine, Generated, PreparedJob, RawSequence, batch_cost
from worker.errors import JobFailure
from worker.scheduling.holders import Holds
from worker.serving.metrics import Metrics

log = logging.getLogger("belle.batcher")

PADDING_EFFICIENCY = 0.5  # a generate() call's real tokens / padded tokens may not fall below this
REPORT_EVERY_S = 10.0  # a decoding batch that runs on is summarised in the log this often
INTERACTIVE, BULK = 0, 1  # priorities: lower goes first


class BatcherStopped(RuntimeError):
    """The worker is shutting down before this job ran; its message should go back to the queue."""


class JobCancelled(RuntimeError):
    """The job was cancelled before it started to run."""


# A batcher that holds work and has not gone round its loop for this long is stuck (see Batcher.healthy).
STALL_S = 600.0


class DuplicateJob(RuntimeError):
    """This job is already waiting or running here (a duplicate message)."""


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


@dataclass(eq=False)
class _Pending:
    job: PreparedJob
    key: tuple | None  # the generate() batch key of a beam search job; None for a stepwise job
    arrived: float
    priority: int = INTERACTIVE
    order: int = 0  # arrival number, for a stable order within a priority
    future: Future = field(default_factory=Future)
    active: ActiveJob | None = None  # a stepwise job set aside after running out of memory: its progress
    exclusive: bool = False  # runs alone, once the decoding batch is empty: a job on its last attempt, or a beam job out of memory beside a batch
    settled: bool = False  # its outcome is on its way to its task thread
    counted: bool = False  # its attempt was counted (it started generating)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(rows, longest input, most tokens still to generate) of this job in a decoding batch."""
        if self.active is not None:
            rows = self.active.live_rows
            return len(rows), max(len(r.inputs) for r in rows), max(r.remaining for r in rows)
        return self.job.request.num_return_sequences, len(self.job.input_ids), self.job.max_new_tokens

    def expired(self, now: float) -> bool:
        deadline = self.job.request.deadline
        return self.active is None and deadline is not None and now > deadline


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

    def __init__(self, engine: Engine | None, settings: Settings, *, publisher=None, cancellations=None, metrics: Metrics | None = None,
                 generating: Callable[[list[str]], None] | None = None):
        self.engine = engine
        self.publisher = publisher
        self.cancellations = cancellations
        self.generating = generating  # told which jobs start generating, before they do (their attempts)
        self.max_attempts = settings.max_attempts
        self.crash_on = settings.fault_crash_on
        self.metrics = metrics or Metrics()
        self.max_size = settings.batch_max_size
        self.interactive_size = self.max_size + max(1, self.max_size // 4)
        self.max_prefill_tokens = settings.batch_max_prefill_tokens
        self.stream_interval_s = settings.stream_interval_ms / 1000
        self.wait_s = settings.batch_wait_ms / 1000
        self.max_delay_s = settings.batch_max_delay_ms / 1000
        self.budget = TokenBudget(settings.batch_max_tokens)
        self._pending: list[_Pending] = []
        self._arrivals = itertools.count()
        self._joins = itertools.count(1)
        self._batch: DecodeBatch | None = None  # made on the batcher thread, once the engine is there
        self._in_batch: dict[str, _Pending] = {}  # the decoding batch's jobs, by id (batcher thread only)
        self._stats = DecodeStats()
        self._cond = threading.Condition()  # guards what task threads share with the batcher thread (see the module's doc)
        self._held: set[str] = set()  # jobs submitted whose outcome is not yet handed over
        self._progress_at = time.monotonic()  # when the batcher thread last went round its loop
        self._tracked = Holds()  # jobs whose task records their outcome inside Batcher.handover
        self._handovers: set[str] = set()  # of those, the ones settled whose outcome is not yet recorded
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
        """Take no new jobs in: the jobs being decoded (and those set aside from them) finish, waiting
        ones get ``BatcherStopped`` (their messages go back to the queue), and the thread ends.
        Returns at once (a warm shutdown)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """``drain()``, and wait for the thread to end."""
        self.drain()
        self._thread.join(timeout)

    def submit(self, job: PreparedJob, *, priority: int = INTERACTIVE) -> Future:
        """Queue a prepared job; the future's result is a ``Generated``, or it raises ``JobFailure``
        (``JobCancelled`` if it was cancelled before it ran, ``BatcherStopped`` if the worker stops
        before it runs)."""
        key = None if Engine.decodes_stepwise(job) else Engine.batch_key(job)
        with self._cond:
            if self._stopping:
                raise BatcherStopped("the batcher is stopping")
            if job.job_id in self._held:
                raise DuplicateJob(job.job_id)
            self._held.add(job.job_id)
            # A job on its last attempt runs alone: should its worker die again, it was the one running.
            pending = _Pending(job, key, time.monotonic(), priority, next(self._arrivals), exclusive=job.attempt >= self.max_attempts > 1)
            at = next((i for i, p in enumerate(self._pending) if p.active is None and (p.priority, p.order) > (priority, pending.order)),
                      len(self._pending))
            self._pending.insert(at, pending)
            self.metrics.waiting_jobs.set(len(self._pending))
            self._cond.notify_all()
        return pending.future

    def run(self, job: PreparedJob, *, priority: int = INTERACTIVE) -> Generated:
        return self.submit(job, priority=priority).result()

    @contextlib.contextmanager
    def handover(self, job_id: str) -> Iterator[None]:
        """The block that runs the job and records its outcome: until it exits, a job on its last
        attempt does not start (a crash then would lose this outcome and charge this job)."""
        with self._cond:
            self._tracked.add(job_id)
        try:
            yield
        finally:
            with self._cond:
                if self._tracked.release(job_id):
                    self._handovers.discard(job_id)
                self._cond.notify_all()

    def healthy(self, stall_s: float = STALL_S) -> bool:
        """Whether the batcher thread lives and moves on: False once it has died, or has held work
        without finishing a step (or a generate() call) for ``stall_s`` seconds (a wedged device)."""
        if not self._thread.is_alive():
            return False
        with self._cond:
            busy = bool(self._held)
        return not busy or time.monotonic() - self._progress_at < stall_s

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
            self._progress_at = time.monotonic()
            with self._cond:
                work = self._next_work()
            self._progress_at = time.monotonic()
            if work is None:
                return
            kind, items = work
            try:
                if kind == "generate":
                    self._generate(items)
                elif kind == "join":
                    self._join(items)
                elif kind == "end":
                    self._settle([], items)
                if self._decoding:
                    self._step()
            except Exception as exc:  # a bug here must not leave task threads waiting forever
                log.exception("the batcher failed")
                failure = JobFailure(ErrorCode.GENERATION_ERROR, f"the batcher failed: {type(exc).__name__}: {exc}"[:2000])
                with self._cond:
                    waiting = {id(p) for p in self._pending}
                stranded = [p for p in [*(i for i in items if isinstance(i, _Pending)), *self._in_batch.values()]
                            if not p.settled and id(p) not in waiting]
                self._settle([], [(p, failure) for p in stranded])
                self._in_batch.clear()
                self._batch.arena.release()
                self._batch = DecodeBatch(self.engine)

    @property
    def _decoding(self) -> bool:
        return self._batch is not None and len(self._batch) > 0

    def _next_work(self) -> tuple[str, list] | None:
        """Wait (holding the condition) until there is work: jobs to end (expired, cancelled, or
        turned away at shutdown), a generate() call, jobs to join, or a decoding step. None once
        stopped."""
        while True:
            self._progress_at = time.monotonic()  # waiting here (for jobs, their due time, or outcomes to be recorded) is not a stall
            if self._stopping:
                turned_away = [p for p in self._pending if p.active is None]
                if turned_away:
                    self._pending = [p for p in self._pending if p.active is not None]
                    return "end", [(p, BatcherStopped("the worker is shutting down")) for p in turned_away]
                if self._pending and not self._runs_alone() and self._waits_to_run_alone() is None and (joining := self._select_join()):
                    return self._take("join", joining)
                if self._decoding:
                    return "step", []
                return None
            if self._pending:
                now = time.time()
                ended = []
                for p in self._pending:
                    if p.expired(now):
                        ended.append((p, self._expiry(p)))
                    elif p.active is None and self._is_cancelled(p.job.job_id):
                        ended.append((p, JobCancelled(p.job.job_id)))
                if ended:
                    return self._take("end", [p for p, _ in ended], ended)
                wait = self._until_due()
                if wait <= 0 and (work := self._select()) is not None:
                    return work
                if not self._decoding:
                    self._cond.wait(max(wait, 0.001) if wait > 0 else 0.05)
                    continue
            if self._decoding:
                return "step", []
            self._cond.wait()

    def _take(self, kind: str, taken: list[_Pending], items: list | None = None) -> tuple[str, list]:
        ids = {id(p) for p in taken}
        self._pending = [p for p in self._pending if id(p) not in ids]
        self.metrics.waiting_jobs.set(len(self._pending))
        return kind, items if items is not None else taken

    def _waits_to_run_alone(self) -> _Pending | None:
        """The first waiting job that must run alone (see _select)."""
        return next((p for p in self._pending if p.exclusive), None)

    def _runs_alone(self) -> bool:
        return any(p.exclusive for p in self._in_batch.values())

    def _until_due(self) -> float:
        """Seconds until the waiting jobs should be taken in (≤ 0: now)."""
        first, last = self._pending[0], self._pending[-1]
        room = self.max_size - len(self._batch.jobs)
        if first.active is not None or len(self._pending) >= room or self._waits_to_run_alone() is not None:
            return 0.0
        return min(first.arrived + self.max_delay_s, last.arrived + self.wait_s) - time.monotonic()

    def _select(self) -> tuple[str, list] | None:
        if self._runs_alone():
            return None
        alone = self._waits_to_run_alone()
        # A job that must run alone goes first, wherever it waits, so that a trickle of interactive
        # jobs cannot keep the decoding batch from draining: no joins until it has run.
        if alone is not None and (self._decoding or self._handovers):
            return None  # the decoding batch drains and its outcomes are recorded, then it runs alone
        anchor = alone or self._pending[0]
        if anchor.key is not None:
            return self._take("generate", self._select_generate(anchor))
        joining = [anchor] if alone is not None else self._select_join()
        return self._take("join", joining) if joining else None

    def _select_join(self) -> list[_Pending]:
        """Waiting jobs that join the decoding batch now (none runs alone or waits to: see _select)."""
        batch = self._batch
        jobs, rows, width = len(batch.jobs), len(batch), batch.length
        remaining = max((r.remaining for r in batch.rows), default=0)
        joining: list[_Pending] = []
        for pending in self._pending:
            if pending.key is not None:
                continue  # beam search waits for its turn as the first waiting job
            if self._stopping and pending.active is None:
                continue
            if jobs + len(joining) >= (self.interactive_size if pending.priority == INTERACTIVE else self.max_size):
                break
            n, length, left = pending.shape
            cost = (rows + n) * (max(width, length) + max(remaining, left))
            if cost > self.budget.limit and (joining or jobs):
                break
            joining.append(pending)
            rows, width, remaining = rows + n, max(width, length), max(remaining, left)
        return joining

    def _select_generate(self, anchor: _Pending) -> list[_Pending]:
        group = sorted((p for p in self._pending if p.key == anchor.key and not p.exclusive), key=lambda p: len(p.job.input_ids))
        if anchor.exclusive:
            return [anchor]
        # A window of max_size jobs (in prompt-length order) that holds the anchor, at one end of the
        # group when it can, so that what is left over stays one contiguous run for the next call.
        at = group.index(anchor)
        start = min(max(0, at - self.max_size + 1) if at >= self.max_size else 0, max(0, len(group) - self.max_size))
        start = min(start, at)
        window = group[start:start + self.max_size]
        # Then trim from the side farther from the anchor until the budget and padding rules hold.
        batch = [anchor]
        for candidate in sorted(window, key=lambda p: abs(len(p.job.input_ids) - len(anchor.job.input_ids))):
            if candidate is anchor or len(batch) >= self.max_size:
                continue
            trial = [p.job for p in batch] + [candidate.job]
            if batch_cost(trial) <= self.budget.limit and _padding_efficiency(trial) >= PADDING_EFFICIENCY:
                batch.append(candidate)
        return batch

    def _requeue(self, items: list[_Pending]) -> None:
        """Put jobs back at the front of the waiting line, in their order."""
        with self._cond:
            self._pending[:0] = items
            self.metrics.waiting_jobs.set(len(self._pending))

    def _is_cancelled(self, job_id: str) -> bool:
        return self.cancellations is not None and self.cancellations.is_cancelled(job_id)

    def _expiry(self, pending: _Pending) -> JobFailure:
        return JobFailure(ErrorCode.EXPIRED, f"the job's deadline ({pending.job.request.deadline:.0f}, Unix seconds) passed before it started; "
                                             "submit it again with a later deadline", parameter="deadline")

    def _settle(self, chunks: list[StreamChunk], outcomes: list[tuple[_Pending, Generated | BaseException]]) -> None:
        """Publish a step's chunks, then hand these jobs their outcomes: through the publisher's queue,
        so that a job's record ends (its task thread writes the end event) after all its chunks."""
        twice = [p for p, _ in outcomes if p.settled]
        if twice:  # a bug: the first outcome stands
            log.error("jobs settled twice (their first outcome stands): %s", ", ".join(p.job.job_id for p in twice))
            outcomes = [(p, o) for p, o in outcomes if not p.settled]
        for pending, _ in outcomes:
            pending.settled = True
            if self._in_batch.get(pending.job.job_id) is pending:
                del self._in_batch[pending.job.job_id]
        with self._cond:
            for pending, _ in outcomes:
                if pending.job.job_id in self._tracked:
                    self._handovers.add(pending.job.job_id)

        def resolve() -> None:
            for pending, outcome in outcomes:
                try:
                    if isinstance(outcome, BaseException):
                        pending.future.set_exception(outcome)
                    else:
                        pending.future.set_result(outcome)
                except InvalidStateError:  # resolved meanwhile: the first outcome stands
                    pass
            with self._cond:  # handed over: a later copy of the job may be submitted
                self._held.difference_update(p.job.job_id for p, _ in outcomes)

        if self.publisher is None:
            resolve()
        elif chunks or outcomes:
            self.publisher.publish(chunks, then=resolve)

    # --- the decoding batch ---

    def _count_attempts(self, items: list[_Pending]) -> None:
        """Tell that these jobs start generating (their attempts), before they do."""
        fresh = [p for p in items if not p.counted]
        for pending in fresh:
            pending.counted = True
        if fresh and self.generating is not None:
            try:
                self.generating([p.job.job_id for p in fresh])
            except Exception as exc:  # counting attempts must not stop the work
                log.warning("could not count the attempts of %d jobs: %s", len(fresh), exc)
        if self.crash_on is not None and any(self.crash_on in _prompt_text(p.job.request) for p in items):
            log.critical("BELLE_FAULT_CRASH_ON: a job that kills its worker starts generating; this worker process dies now (fault injection)")
            os._exit(70)

    def _join(self, items: list[_Pending]) -> None:
        engine, batch = self.engine, self._batch
        self._count_attempts(items)
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
            for pending in items:
                pending.active.joined = next(self._joins)
                self._in_batch[pending.job.job_id] = pending
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
                self._settle([], [(items[0], self._oom_failure(items[0].job, cost))])
                return
            log.warning("out of memory when %d jobs joined a batch of %d (cost %d tokens); they wait; token budget now %d",
                        len(items), before, cost, self.budget.limit)
            self._requeue(items)
            return
        if len(items) == 1:
            log.error("job %s: prefill failed: %s: %s", items[0].job.job_id, type(error).__name__, error)
            self._settle([], [(items[0], JobFailure(ErrorCode.GENERATION_ERROR, f"generation failed: {type(error).__name__}: {error}"[:2000]))])
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
        finished = self._until_fits(batch.choose) if len(batch) else None
        chunks = list(batch.chunks) if finished is not None else []
        if finished is not None:
            self._stats.steps += 1
            self._stats.tokens += len(batch)
            self.metrics.steps.inc()
            self.metrics.tokens.inc(len(batch))
            self.metrics.step_rows.observe(len(batch))
        done = []
        for active in jobs:
            if active.finished and active.job_id in self._in_batch:
                generated = self._result(active)
                if isinstance(generated, Generated):
                    chunks += generated.final_chunks
                done.append((self._in_batch[active.job_id], generated))
        self._settle(chunks, done)
        self._stats.finished += len(done)
        if finished:
            batch.remove(finished)
        if len(batch):
            self._until_fits(batch.forward)
        self._release_if_idle()
        self.metrics.decoding_jobs.set(len(batch.jobs))
        if not len(batch) or time.perf_counter() - self._stats.since >= REPORT_EVERY_S:
            log.info(self._stats.line(len(batch.jobs), self.budget.limit))
            self._stats = DecodeStats()

    def _until_fits(self, action: Callable):
        """Run a part of the decoding step; on running out of memory, set aside the jobs that joined
        last until it fits (a job alone fails). Returns the action's result, or None when no job was
        left to run it."""
        batch = self._batch
        while len(batch):
            cost = batch.cost()
            try:
                return action()
            except torch.OutOfMemoryError:
                pass
            self._free_memory()
            self.budget.failed(cost)
            self.metrics.out_of_memory.labels("step").inc()
            self.metrics.token_budget.set(self.budget.limit)
            jobs = sorted(batch.jobs, key=lambda a: a.joined)  # the last to join are set aside first
            if len(jobs) == 1:
                (only,) = jobs
                batch.remove(only.live_rows)
                self._settle([], [(self._in_batch[only.job_id], self._oom_failure(only.job, cost))])
                return None
            aside = jobs[len(jobs) // 2:]
            self._stats.set_aside += len(aside)
            log.warning("out of memory in a decoding step of %d jobs (cost %d tokens): %d jobs set aside with their tokens; token budget now %d",
                        len(jobs), cost, len(aside), self.budget.limit)
            batch.remove([r for a in aside for r in a.live_rows])
            self._requeue([self._in_batch.pop(a.job_id) for a in aside])
        return None

    def _release_if_idle(self) -> None:
        """An empty decoding batch gives its arena back when memory is tight (after an OOM)."""
        if not len(self._batch) and self.budget.limit < self.budget.ceiling:
            self._batch.arena.release()

    def _free_memory(self) -> None:
        if self._batch is not None and not len(self._batch):
            self._batch.arena.release()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _result(self, active: ActiveJob) -> Generated | JobFailure:
        if active.error is not None:
            log.error("job %s: %s", active.job_id, active.error)
            return JobFailure(ErrorCode.GENERATION_ERROR, active.error)
        output_scores = active.job.request.output_scores
        sequences = [RawSequence(r.tokens, r.logprobs if output_scores else None) for r in active.rows]
        return self.engine.job_result(active.job, sequences, generation_s=time.perf_counter() - active.started, batch_size=active.peak_jobs,
                                      cancelled=active.cancelled, stream=active.stream)

    # --- generate() calls (beam search) ---

    def _generate(self, batch: list[_Pending]) -> None:
        self._count_attempts(batch)
        if not self._decoding:
            self._batch.arena.release()  # all the memory for this call
        jobs = [p.job for p in batch]
        stats = {"splits": 0}
        started = time.perf_counter()
        outcomes = self._run_splitting(jobs, stats)
        retry = [p for p in batch if outcomes[p.job.job_id] is None]
        for pending in retry:
            pending.exclusive = True
            log.warning("job %s ran out of memory beside the decoding batch; it runs once that is empty", pending.job.job_id)
        self._requeue(retry)
        self._settle([], [(p, outcomes[p.job.job_id]) for p in batch if outcomes[p.job.job_id] is not None])
        self.metrics.generate_jobs.observe(len(jobs))
        self.metrics.tokens.inc(sum(o.result.usage.completion_tokens for o in outcomes.values() if isinstance(o, Generated)))
        log.info(
            "generate() batch size=%d tokens=%d (prompt %d, new ≤%d) seconds=%.3f splits=%d budget=%d",
            len(jobs), batch_cost(jobs), sum(len(j.input_ids) for j in jobs), max(j.max_new_tokens for j in jobs),
            time.perf_counter() - started, stats["splits"], self.budget.limit,
        )

    def _run_splitting(self, jobs: list[PreparedJob], stats: dict) -> dict[str, Generated | BaseException | None]:
        """Outcomes by job id; None for a job to retry once the decoding batch is empty."""
        cost = batch_cost(jobs)
        held = self._batch.cost()
        out_of_memory = False
        try:
            generated = self.engine.generate_batch(jobs, self._is_cancelled if self.cancellations is not None else None, held=held)
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
                return {jobs[0].job_id: None if held else self._oom_failure(jobs[0], cost)}
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


def _prompt_text(request) -> str:
    return request.prompt or "".join(m.content for m in request.messages or [])


def _padding_efficiency(jobs: list[PreparedJob]) -> float:
    width = max(len(j.input_ids) for j in jobs)
    real = sum(len(j.input_ids) + j.max_new_tokens for j in jobs)
    return real / (len(jobs) * (width + max(j.max_new_tokens for j in jobs)))
