"""The batcher: one thread that owns the model, and carries out the scheduling policy's plans.

Greedy, sampling and beam search jobs share one continuous decoding batch (worker/model/decoding.py):
between two steps, finished jobs leave it and waiting jobs join it, so no job waits for a whole batch to
end, and jobs with different parameters decode together. Beam sampling jobs run as whole generate()
calls, between two steps. Which jobs run when is decided by worker/scheduling/policy.py
(pure: it returns a ``Plan``); what happens when memory runs out, by worker/scheduling/oom.py.

A streaming job's outcome goes back to its task thread through the publisher's queue, after the chunks
published before it, so its stream always ends after its last chunk; any other job's goes back at once
(``_settle``). The task thread then writes the job's final record (worker/serving/handler.py).

A job on its last attempt (its worker died while generating it before) runs alone, once the decoding
batch is empty and the outcomes before it are recorded (``Batcher.handover``): should the worker die
again, it is the one charged.

Threads and state
  Task threads call ``submit``, ``run`` and ``handover``; the announcer calls ``healthy``; the worker's
  shutdown calls ``drain``. What they share with the batcher thread is guarded by one lock, the
  condition ``_cond``: the waiting line (``_line``), the jobs held and not yet handed their outcome
  (``_held``, by id: a second copy of a job is refused while the first is held), the jobs whose task
  records an outcome (``_tracked``, ``_handovers``) and ``_stopping``. Everything else (the decoding
  batch, its jobs by id ``_in_batch``, the budget, the statistics) belongs to the batcher thread alone.
"""

from __future__ import annotations

import contextlib
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
from worker.errors import JobFailure
from worker.model.decoding import ActiveJob, DecodeBatch, prefill_groups
from worker.model.engine import Engine, Generated, PreparedJob, RawSequence, batch_cost
from worker.scheduling.holders import Holds
from worker.scheduling.oom import MemoryRecovery, generation_failure
from worker.scheduling.policy import (
    BULK,
    INTERACTIVE,
    Action,
    Ending,
    Plan,
    Policy,
    Running,
    Waiting,
    WaitingLine,
)
from worker.serving.metrics import Metrics

__all__ = ["BULK", "INTERACTIVE", "Batcher", "BatcherStopped", "DuplicateJob", "JobCancelled"]

log = logging.getLogger("belle.batcher")

REPORT_EVERY_S = 10.0  # a decoding batch that runs on is summarised in the log this often
# A batcher that holds work and has not gone round its loop for this long is stuck (see Batcher.healthy).
STALL_S = 600.0


class BatcherStopped(RuntimeError):
    """The worker is shutting down before this job ran; its message should go back to the queue."""


class JobCancelled(RuntimeError):
    """The job was cancelled before it started to run."""


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
class Ticket:
    """The batcher's record of one submitted job, from ``submit`` until its outcome is handed over."""

    job: PreparedJob
    waiting: Waiting  # the job as the policy sees it
    future: Future = field(default_factory=Future)
    active: ActiveJob | None = None  # its progress in the decoding batch (kept while it is set aside)
    counted: bool = False  # its attempt was counted (it started generating)
    settled: bool = False  # its outcome is on its way to its task thread

    def set_aside(self) -> Waiting:
        """Back to the waiting line, started, with the tokens it has: its shape is what is left of it."""
        rows = self.active.live_rows
        w = self.waiting
        w.rows, w.length, w.new_tokens, w.resumed = len(rows), max(len(r.inputs) for r in rows), max(r.remaining for r in rows), True
        return w


Outcome = Generated | BaseException


class Batcher:
    """``publisher`` (``.publish(chunks, then, output_events=)``: write the chunks, then call ``then``, in order)
    carries streaming jobs' chunks to Redis, and ``cancellations`` (``.is_cancelled(job_id)``) says
    which jobs to stop; ``attempts`` (``.starting(job_ids)``) is told which jobs start generating, before
    they do. Without them (in-process use) nothing streams, nothing is cancelled and nothing is counted."""

    def __init__(self, engine: Engine | None, settings: Settings, *, publisher=None, cancellations=None, metrics: Metrics | None = None,
                 attempts=None):
        self.engine = engine
        self.publisher = publisher
        self.cancellations = cancellations
        self.attempts = attempts
        self.max_attempts = settings.max_attempts
        self.crash_on = settings.fault_crash_on
        self.metrics = metrics or Metrics()
        self.policy = Policy(max_size=settings.batch_max_size, wait_s=settings.batch_wait_ms / 1000, max_delay_s=settings.batch_max_delay_ms / 1000,
                             yield_s=settings.batch_yield_s)
        self.memory = MemoryRecovery(settings.batch_max_tokens, self.metrics)
        self.max_size = settings.batch_max_size
        self.max_prefill_tokens = settings.batch_max_prefill_tokens
        self.prefix_cache_tokens = settings.prefix_cache_tokens
        self.prefill_chunk = settings.batch_prefill_chunk_tokens
        self.stream_interval_s = settings.stream_interval_ms / 1000
        self._line = WaitingLine()
        self._arrivals = itertools.count()
        self._joins = itertools.count(1)
        self._batch: DecodeBatch | None = None  # made on the batcher thread, once the engine is there
        self._in_batch: dict[str, Ticket] = {}  # the decoding batch's jobs, by id (batcher thread only)
        self._filling: list[Ticket] = []  # jobs whose long prompts are prefilled in chunks, in the batch's order (batcher thread only)
        self._chunk_skipped = False  # the last loop left out its chunk of a long prompt (jobs had joined)
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

    @property
    def budget(self):
        return self.memory.budget

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
        request = job.request
        waiting = Waiting(job.job_id, rows=max(request.num_beams, request.num_return_sequences), length=len(job.input_ids),
                          new_tokens=job.max_new_tokens, arrived=time.monotonic(), priority=priority,
                          key=None if Engine.decodes_stepwise(job) else Engine.batch_key(job), deadline=request.deadline,
                          # A job on its last attempt runs alone: should its worker die again, it was the one running.
                          alone=job.attempt >= self.max_attempts > 1)
        ticket = waiting.ticket = Ticket(job, waiting)
        with self._cond:
            if self._stopping:
                raise BatcherStopped("the batcher is stopping")
            if job.job_id in self._held:
                raise DuplicateJob(job.job_id)
            self._held.add(job.job_id)
            waiting.order = next(self._arrivals)
            self._line.add(waiting)
            self.metrics.waiting_jobs.set(len(self._line))
            self._cond.notify_all()
        return ticket.future

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

    def waiting_ids(self) -> list[str]:
        """The waiting line's job ids, in the order they would be taken."""
        with self._cond:
            return [w.job_id for w in self._line]

    @property
    def decoding(self) -> bool:
        """Whether the decoding batch has rows (read from another thread, it may already be stale)."""
        return self._batch is not None and len(self._batch) > 0

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
            self._batch = DecodeBatch(self.engine, prefix_cache_tokens=self.prefix_cache_tokens)
            self._loop()

    def _loop(self) -> None:
        while True:
            self._progress_at = time.monotonic()
            plan = self._next_plan()
            self._progress_at = time.monotonic()
            if plan.action is Action.STOP:
                return
            try:
                self._carry_out(plan)
            except Exception as exc:  # a bug here must not leave task threads waiting forever
                self._recover_from_bug(plan, exc)

    def _next_plan(self) -> Plan:
        """Wait (holding the condition) until the policy has something to do; the jobs it takes leave the
        waiting line."""
        with self._cond:
            while True:
                self._progress_at = time.monotonic()  # waiting here (for jobs, their due time, or outcomes to be recorded) is not a stall
                plan = self.policy.plan(self._line, self._running(), budget=self.budget.limit, now=time.monotonic(), wall=time.time(),
                                        stopping=self._stopping, is_cancelled=self._is_cancelled)
                if plan.action is not Action.WAIT:
                    if plan.jobs:
                        self._line.remove(plan.jobs)
                        self.metrics.waiting_jobs.set(len(self._line))
                    return plan
                self._cond.wait(plan.wait_s)

    def _running(self) -> Running:
        """The decoding batch as the policy sees it; jobs being prefilled in chunks count as in it."""
        batch = self._batch
        jobs = batch.jobs + batch.filling_jobs
        # (read by the policy for waiting jobs of several rows only: not worth a list per step when none waits)
        decoding = tuple((t.waiting.priority, len(t.active.live_rows)) for t in self._in_batch.values() if t.active is not None) if self._line else ()
        return Running(jobs=len(jobs), rows=len(batch) + sum(len(a.rows) for a in batch.filling_jobs), decoding=decoding, lanes=tuple(batch.shapes()),
                       alone=any(t.waiting.alone for t in [*self._in_batch.values(), *self._filling]), outcomes_unrecorded=bool(self._handovers))

    def _carry_out(self, plan: Plan) -> None:
        tickets = [w.ticket for w in plan.jobs]
        if plan.action is Action.END:
            self._settle([], [(t, self._ending(t, why)) for t, why in zip(tickets, plan.endings, strict=True)])
        elif plan.action is Action.GENERATE:
            self._generate(tickets)
        elif plan.action is Action.JOIN:
            self._join(tickets)
        # Then one chunk of a long prompt, except right after jobs joined (every other time at most, so that
        # arrivals cannot hold it back for good): they get their first token at this step, not a chunk later...
        if self._filling and (plan.action is not Action.JOIN or self._chunk_skipped):
            self._fill()
            self._chunk_skipped = False
        elif self._filling:
            self._chunk_skipped = True
        if len(self._batch):  # ...and the decoding batch moves on by one step
            self._step()

    def _recover_from_bug(self, plan: Plan, exc: Exception) -> None:
        log.exception("the batcher failed")
        failure = JobFailure(ErrorCode.GENERATION_ERROR, f"the batcher failed: {type(exc).__name__}: {exc}"[:2000])
        with self._cond:
            waiting = {id(w.ticket) for w in self._line}
        stranded = [t for t in [*(w.ticket for w in plan.jobs), *self._in_batch.values(), *self._filling] if not t.settled and id(t) not in waiting]
        self._settle([], [(t, failure) for t in stranded])
        self._in_batch.clear()
        self._filling.clear()
        self._batch.release()
        self._batch = DecodeBatch(self.engine, prefix_cache_tokens=self.prefix_cache_tokens)

    def _ending(self, ticket: Ticket, why: Ending) -> BaseException:
        if why is Ending.SHUTDOWN:
            return BatcherStopped("the worker is shutting down")
        if why is Ending.CANCELLED:
            return JobCancelled(ticket.job.job_id)
        return JobFailure(ErrorCode.EXPIRED, f"the job's deadline ({ticket.job.request.deadline:.0f}, Unix seconds) passed before it started; "
                                             "submit it again with a later deadline", parameter="deadline")

    def _put_back(self, tickets: list[Ticket]) -> None:
        """Jobs taken that could not run yet: back at the front of the waiting line, in their order."""
        with self._cond:
            self._line.put_back([t.waiting for t in tickets])
            self.metrics.waiting_jobs.set(len(self._line))

    def _is_cancelled(self, job_id: str) -> bool:
        return self.cancellations is not None and self.cancellations.is_cancelled(job_id)

    def _settle(self, chunks: list[StreamChunk], outcomes: list[tuple[Ticket, Outcome]]) -> None:
        """Publish a step's chunks, and hand these jobs their outcomes: a streaming job's through the
        publisher's queue, after the chunks queued before it, so that its record ends (its task thread
        writes the end event) after all its chunks; any other job's at once (it has no chunks to wait for)."""
        output_events = self._wanting_output_events(chunks)
        twice = [t for t, _ in outcomes if t.settled]
        if twice:  # a bug: the first outcome stands
            log.error("jobs settled twice (their first outcome stands): %s", ", ".join(t.job.job_id for t in twice))
            outcomes = [(t, o) for t, o in outcomes if not t.settled]
        for ticket, _ in outcomes:
            ticket.settled = True
            if self._in_batch.get(ticket.job.job_id) is ticket:
                del self._in_batch[ticket.job.job_id]
        with self._cond:
            for ticket, _ in outcomes:
                if ticket.job.job_id in self._tracked:
                    self._handovers.add(ticket.job.job_id)

        if self.publisher is None:
            self._hand_over(outcomes)
            return
        streamed = [(t, o) for t, o in outcomes if t.job.request.stream]
        if len(streamed) < len(outcomes):
            self._hand_over([(t, o) for t, o in outcomes if not t.job.request.stream])
        if chunks or streamed:
            self.publisher.publish(chunks, then=lambda: self._hand_over(streamed), output_events=output_events)

    def _wanting_output_events(self, chunks: list[StreamChunk]) -> set[str]:
        """The jobs of these chunks whose webhook asked for output events (or whose request is not known here)."""
        wanting = set()
        for job_id in {chunk.job_id for chunk in chunks}:
            ticket = self._in_batch.get(job_id)
            request = ticket.job.request if ticket is not None else None
            if request is None or (request.webhook is not None and "output" in request.webhook_events_filter):
                wanting.add(job_id)
        return wanting

    def _hand_over(self, outcomes: list[tuple[Ticket, Outcome]]) -> None:
        """Resolve the jobs' futures: their task threads write their final records."""
        for ticket, outcome in outcomes:
            try:
                if isinstance(outcome, BaseException):
                    ticket.future.set_exception(outcome)
                else:
                    ticket.future.set_result(outcome)
            except InvalidStateError:  # resolved meanwhile: the first outcome stands
                pass
        with self._cond:  # handed over: a later copy of the job may be submitted
            self._held.difference_update(t.job.job_id for t, _ in outcomes)

    def _count_attempts(self, tickets: list[Ticket]) -> None:
        """Tell that these jobs start generating (their attempts), before they do."""
        fresh = [t for t in tickets if not t.counted]
        for ticket in fresh:
            ticket.counted = True
        if fresh and self.attempts is not None:
            try:
                self.attempts.starting([t.job.job_id for t in fresh])
            except Exception as exc:  # counting attempts must not stop the work
                log.warning("could not count the attempts of %d jobs: %s", len(fresh), exc)
        if self.crash_on is not None and any(self.crash_on in _prompt_text(t.job.request) for t in tickets):
            log.critical("BELLE_FAULT_CRASH_ON: a job that kills its worker starts generating; this worker process dies now (fault injection)")
            os._exit(70)

    # --- the decoding batch ---

    def _join(self, tickets: list[Ticket]) -> None:
        engine, batch = self.engine, self._batch
        self._count_attempts(tickets)
        for ticket in tickets:
            if ticket.active is None:
                ticket.active = ActiveJob.start(ticket.job, engine, streaming=ticket.job.request.stream and self.publisher is not None,
                                                stream_interval_s=self.stream_interval_s)
        if self.prefill_chunk and (chunked := [t for t in tickets if batch.fills_in_chunks(t.active.live_rows, self.prefill_chunk)]):
            for ticket in chunked:
                batch.begin_fill(ticket.active.live_rows)
                self._filling.append(ticket)
            log.info("batch: %d jobs with long prompts (%s tokens) are prefilled %d tokens at a time", len(chunked),
                     ", ".join(str(len(t.job.input_ids)) for t in chunked), self.prefill_chunk)
            tickets = [t for t in tickets if t not in chunked]
            if not tickets:
                return
        rows = [r for t in tickets for r in t.active.live_rows]
        before = len(batch.jobs)
        groups = prefill_groups(rows, self.max_size, self.max_prefill_tokens)
        cost = batch.cost_with(groups)
        started = time.perf_counter()
        error: Exception | None = None
        out_of_memory = False
        try:
            engine.check_memory(cost, f"{len(tickets)} jobs joining a batch of {before}")
            batch.join(groups)
        except torch.OutOfMemoryError:
            out_of_memory = True
        except Exception as exc:
            error = exc
        else:
            self._joined(tickets, cost, fresh=before == 0)
            log.info("batch: %d jobs joined (%d rows, %d prefill calls, %d prompt tokens, %.3f s); now %d jobs, %d rows in lanes of %s "
                     "(rows × columns); budget=%d", len(tickets), len(rows), len(groups), sum(len(r.inputs) for r in rows),
                     time.perf_counter() - started, len(batch.jobs), len(batch), batch.describe(), self.budget.limit)
            return
        if out_of_memory:  # outside the except block: the exception's frames (and the tensors they hold) are gone
            self.memory.ran_out("join", cost, self._release_if_empty)
            if len(tickets) == 1 and before == 0 and not self._filling:
                self._settle([], [(tickets[0], self.memory.failure(tickets[0].job, cost))])
                return
            log.warning("out of memory when %d jobs joined a batch of %d (cost %d tokens); they wait; token budget now %d",
                        len(tickets), before, cost, self.budget.limit)
            for ticket in tickets:  # started (their attempts counted): they are not ended or turned away while they wait again
                ticket.set_aside()
            self._put_back(tickets)
            return
        if len(tickets) == 1:
            log.error("job %s: prefill failed: %s: %s", tickets[0].job.job_id, type(error).__name__, error)
            self._settle([], [(tickets[0], generation_failure(error))])
            return
        log.warning("%d jobs joining raised %s: %s; joining them in halves to isolate the job at fault", len(tickets), type(error).__name__, error)
        half = len(tickets) // 2
        self._join(tickets[:half])
        self._join(tickets[half:])

    def _joined(self, tickets: list[Ticket], cost: int, *, fresh: bool) -> None:
        """These jobs decode now (``fresh``: they started the batch)."""
        if fresh:
            self._stats = DecodeStats()
        self._stats.joined += len(tickets)
        for ticket in tickets:
            ticket.active.joined = next(self._joins)
            self._in_batch[ticket.job.job_id] = ticket
        self.memory.succeeded(cost)
        self.metrics.joined.observe(len(tickets))
        self.metrics.decoding_jobs.set(len(self._batch.jobs))

    def _fill(self) -> None:
        """One chunk of the first long prompt being prefilled; once it is all in, its job decodes."""
        batch = self._batch
        cancelled = [t for t in self._filling if self._is_cancelled(t.job.job_id)]
        for ticket in cancelled:
            log.info("job %s: cancelled while its prompt was prefilled", ticket.job.job_id)
            self._filling.remove(ticket)
            batch.abandon_fill(ticket.active)
            ticket.active.cancel()
        if cancelled:
            self._settle([], [(t, self._result(t.active)) for t in cancelled])
        if not self._filling:
            return
        ticket = self._filling[0]
        active = ticket.active
        cost = batch.cost()
        error: Exception | None = None
        out_of_memory = False
        try:
            self.engine.check_memory(cost, f"a long prompt's chunk beside a batch of {len(batch.jobs)}")
            joined = batch.fill(self.prefill_chunk)
        except torch.OutOfMemoryError:
            out_of_memory = True
        except Exception as exc:
            error = exc
        else:
            if joined:
                self._filling.pop(0)
                self._joined([ticket], cost, fresh=len(batch.jobs) == 1)
                log.info("batch: job %s joined once its %d-token prompt was prefilled; now %d jobs, %d rows in lanes of %s (rows × columns)",
                         ticket.job.job_id, len(ticket.job.input_ids), len(batch.jobs), len(batch), batch.describe())
            return
        self._filling.pop(0)
        batch.abandon_fill(active)
        if out_of_memory:
            self.memory.ran_out("join", cost, self._release_if_empty)
            if not len(batch) and not self._filling:
                self._settle([], [(ticket, self.memory.failure(ticket.job, cost))])
                return
            log.warning("out of memory while prefilling job %s's prompt beside a batch of %d (cost %d tokens); it waits; token budget now %d",
                        ticket.job.job_id, len(batch.jobs), cost, self.budget.limit)
            ticket.set_aside()
            self._put_back([ticket])
            return
        log.error("job %s: prefill failed: %s: %s", ticket.job.job_id, type(error).__name__, error)
        self._settle([], [(ticket, generation_failure(error))])

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
        step = self._until_fits(batch.choose) if len(batch) else None
        chunks = list(step.chunks) if step is not None else []
        if step is not None:
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
        if step is not None and step.finished:
            batch.remove(step.finished)
        if len(batch):
            self._until_fits(batch.forward)
        if batch.idle and self.budget.tight:
            self._batch.release()  # an empty decoding batch gives its arena back when memory is tight
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
            self.memory.ran_out("step", cost, self._batch.shed)
            if self._filling:  # the long prompts being prefilled wait first: they hold memory and no token yet
                self._set_aside_filling()
                continue
            jobs = sorted(batch.jobs, key=lambda a: a.joined)
            if len(jobs) == 1:
                (only,) = jobs
                batch.remove(only.live_rows)
                self._settle([], [(self._in_batch[only.job_id], self.memory.failure(only.job, cost))])
                return None
            aside = self.memory.set_aside(jobs)
            self._stats.set_aside += len(aside)
            log.warning("out of memory in a decoding step of %d jobs (cost %d tokens): %d jobs set aside with their tokens; token budget now %d",
                        len(jobs), cost, len(aside), self.budget.limit)
            batch.remove([r for a in aside for r in a.live_rows])
            set_aside = [self._in_batch.pop(a.job_id) for a in aside]
            for ticket in set_aside:
                ticket.set_aside()
            self._put_back(set_aside)
        return None

    def _set_aside_filling(self) -> None:
        tickets, self._filling = self._filling, []
        for ticket in tickets:
            self._batch.abandon_fill(ticket.active)
            ticket.set_aside()
        log.warning("out of memory in a decoding step: %d jobs whose prompts were being prefilled wait", len(tickets))
        self._put_back(tickets)

    def _release_if_empty(self) -> None:
        """After running out of memory: drop what holds no row, and every arena when nothing runs."""
        if self._batch is not None:
            self._batch.shed()
            if self._batch.idle:
                self._batch.release()

    def _result(self, active: ActiveJob) -> Generated | JobFailure:
        if active.error is not None:
            log.error("job %s: %s", active.job_id, active.error)
            return JobFailure(ErrorCode.GENERATION_ERROR, active.error)
        request = active.job.request
        if active.beams is not None:
            sequences = [RawSequence(h.tokens, h.logprobs if request.output_scores else None, h.score) for h in active.beams.best(request.num_return_sequences)]
        else:
            sequences = [RawSequence(r.tokens, r.logprobs if request.output_scores else None) for r in active.rows]
        first_token_s = None if active.first_token_at is None else active.first_token_at - active.started
        if active.first_token_at is not None:
            self.metrics.observe_time_between_tokens(time.perf_counter() - active.first_token_at, max((len(r.tokens) for r in active.rows), default=0))
        return self.engine.job_result(active.job, sequences, generation_s=time.perf_counter() - active.started, batch_size=active.peak_jobs,
                                      cancelled=active.cancelled, stream=active.stream, admission_s=active.started - active.job.prepared_at,
                                      first_token_s=first_token_s)

    # --- generate() calls (beam sampling) ---

    def _generate(self, tickets: list[Ticket]) -> None:
        self._count_attempts(tickets)
        if self._batch.idle:
            self._batch.release()  # all the memory for this call
        jobs = [t.job for t in tickets]
        splits = [0]
        started = time.perf_counter()
        held = self._batch.cost()
        is_cancelled = self._is_cancelled if self.cancellations is not None else None
        outcomes = self.memory.run_splitting(jobs, lambda part: self.engine.generate_batch(part, is_cancelled, held=held), beside_batch=bool(held),
                                             splits=splits)
        retry = [t for t in tickets if outcomes[t.job.job_id] is None]
        for ticket in retry:
            ticket.waiting.alone = True
            log.warning("job %s ran out of memory beside the decoding batch; it runs once that is empty", ticket.job.job_id)
        self._put_back(retry)
        self._settle([], [(t, outcomes[t.job.job_id]) for t in tickets if outcomes[t.job.job_id] is not None])
        self.metrics.generate_jobs.observe(len(jobs))
        self.metrics.tokens.inc(sum(o.result.usage.completion_tokens for o in outcomes.values() if isinstance(o, Generated)))
        log.info(
            "generate() batch size=%d tokens=%d (prompt %d, new ≤%d) seconds=%.3f splits=%d budget=%d",
            len(jobs), batch_cost(jobs), sum(len(j.input_ids) for j in jobs), max(j.max_new_tokens for j in jobs),
            time.perf_counter() - started, splits[0], self.budget.limit,
        )


def _prompt_text(request) -> str:
    return request.prompt or "".join(m.content for m in request.messages or [])
