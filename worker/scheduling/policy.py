"""Which waiting jobs run next: a pure function of the waiting line, the decoding batch's shape, the token
budget and the clock. No torch, no threads: ``Policy.plan`` returns a ``Plan`` value, and the batcher
(worker/scheduling/batcher.py) carries it out.

The rules
  - Waiting jobs are kept in order (``WaitingLine``): jobs set aside after running out of memory first of
    all, then interactive jobs before bulk ones (the queue a job came from), then by arrival.
  - Waiting jobs are taken in at once: by an idle batcher, and by a running one at its next step (jobs that
    arrive while a step or a prefill runs are taken in together after it, so a burst is still prefilled in
    groups, without anyone waiting for company). With ``wait_s`` > 0 (``BELLE_BATCH_WAIT_MS``) they are
    taken in once no new job has arrived for ``wait_s``, or the first has waited ``max_delay_s``, or a
    full batch is waiting.
  - Jobs join in that order while the batch holds fewer than ``max_size`` jobs (interactive jobs may take it
    a quarter over) and its cost stays within the token budget. The first job that does not fit stops the
    ones behind it, so none is overtaken forever; an empty batch always takes its first waiting job.
  - Fewer rows first, for a while: during its first ``yield_s`` seconds of waiting (BELLE_BATCH_YIELD_S), a
    job of several rows (beams, returned sequences) comes after the jobs of its priority with fewer rows,
    and does not join while a job of its priority (or a higher one) with fewer rows decodes. A step costs per row on a CPU: one beam-4 job
    costs what four greedy jobs cost, and decoding them together would slow the greedy jobs as much.
  - When the first waiting job is a beam sampling job, it runs in one generate() call with the waiting jobs
    that share its generation config (nearest in prompt length, within the size, budget and padding limits).
  - A job that must run alone (its last attempt, or a beam sampling job that ran out of memory beside the decoding
    batch) goes first, wherever it waits: no job joins until the decoding batch has drained, the outcomes
    before it are recorded, and it has run.
  - A job cancelled or past its deadline while it waits ends there; at shutdown every waiting job that has
    not started is turned away (its message goes back to the queue) and the jobs set aside finish.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from worker.costs import LaneShape, lanes_cost, place, tokens_held

INTERACTIVE, BULK = 0, 1  # priorities: lower goes first
PADDING_EFFICIENCY = 0.5  # a generate() call's real tokens / padded tokens may not fall below this
POLL_S = 0.05  # how often a line that cannot move yet (a job waits to run alone) is looked at again


@dataclass(eq=False)
class Waiting:
    """A job in the waiting line, as the policy sees it. ``ticket`` is the batcher's own record of it."""

    job_id: str
    rows: int  # rows it takes: beams or returned sequences
    length: int  # its longest input (prompt, plus the tokens it has when it was set aside)
    new_tokens: int  # most tokens it still has to generate
    arrived: float  # monotonic seconds
    priority: int = INTERACTIVE
    order: int = 0  # arrival number: a stable order within a priority
    key: tuple | None = None  # its generate() batch key (beam sampling); None: it joins the decoding batch
    deadline: float | None = None  # Unix seconds; only a job that has not started can expire
    resumed: bool = False  # set aside after running out of memory, with its progress
    alone: bool = False  # runs alone, once the decoding batch is empty
    ticket: Any = None

    def expired(self, wall: float) -> bool:
        return not self.resumed and self.deadline is not None and wall > self.deadline


def batch_cost(jobs: Sequence[Waiting]) -> int:
    """Tokens a batch holds at its longest: rows × (longest input + most new tokens)."""
    return tokens_held(sum(j.rows for j in jobs), max(j.length for j in jobs), max(j.new_tokens for j in jobs))


def padding_efficiency(jobs: Sequence[Waiting]) -> float:
    width = max(j.length for j in jobs)
    real = sum(j.length + j.new_tokens for j in jobs)
    return real / (len(jobs) * (width + max(j.new_tokens for j in jobs)))


class WaitingLine:
    """The waiting jobs in the order they are taken (see the module's doc)."""

    def __init__(self) -> None:
        self._jobs: list[Waiting] = []

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Waiting]:
        return iter(list(self._jobs))

    def __getitem__(self, index: int) -> Waiting:
        return self._jobs[index]

    def add(self, job: Waiting) -> None:
        """Behind every job set aside and every job of the same or a higher priority."""
        at = next((i for i, w in enumerate(self._jobs) if not w.resumed and (w.priority, w.order) > (job.priority, job.order)), len(self._jobs))
        self._jobs.insert(at, job)

    def put_back(self, jobs: Sequence[Waiting]) -> None:
        """Jobs that were taken and could not run yet: at the front of the line, in their order."""
        self._jobs[:0] = jobs

    def remove(self, jobs: Sequence[Waiting]) -> None:
        taken = {id(j) for j in jobs}
        self._jobs = [j for j in self._jobs if id(j) not in taken]

    def first_alone(self) -> Waiting | None:
        return next((j for j in self._jobs if j.alone), None)


@dataclass(frozen=True)
class Running:
    """The decoding batch as the policy sees it."""

    jobs: int = 0
    rows: int = 0
    decoding: tuple[tuple[int, int], ...] = ()  # (priority, live rows) of each of its jobs
    lanes: tuple[LaneShape, ...] = ()  # its lanes (rows that share a KV arena and its columns)
    alone: bool = False  # a job that runs alone is in it
    outcomes_unrecorded: bool = False  # jobs that run alone wait until every outcome before them is recorded


class Action(enum.Enum):
    END = "end"  # end these waiting jobs without running them (``Plan.endings`` says why)
    GENERATE = "generate"  # run these jobs in one generate() call
    JOIN = "join"  # prefill these jobs into the decoding batch
    STEP = "step"  # run one decoding step
    WAIT = "wait"  # nothing to do until a job arrives, or for ``Plan.wait_s``
    STOP = "stop"  # stopping, and nothing is left to run


class Ending(enum.Enum):
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class Plan:
    action: Action
    jobs: tuple[Waiting, ...] = ()
    endings: tuple[Ending, ...] = ()  # for END: why each of ``jobs`` ends
    wait_s: float | None = None  # for WAIT: None waits for an arrival

    @property
    def job_ids(self) -> list[str]:
        return [j.job_id for j in self.jobs]


class Policy:
    def __init__(self, *, max_size: int, wait_s: float, max_delay_s: float, yield_s: float = 0.0):
        self.max_size = max_size
        self.yield_s = yield_s
        self.interactive_size = max_size + max(1, max_size // 4)
        self.wait_s = wait_s
        self.max_delay_s = max_delay_s

    def plan(self, line: WaitingLine, running: Running, *, budget: int, now: float, wall: float, stopping: bool = False,
             is_cancelled: Callable[[str], bool] = lambda _: False) -> Plan:
        """What to do next. ``now``: monotonic seconds (arrivals); ``wall``: Unix seconds (deadlines)."""
        if stopping:
            return self._plan_stopping(line, running, budget)
        if len(line):
            ended = [(w, why) for w in line if (why := self._ending(w, wall, is_cancelled)) is not None]
            if ended:
                return Plan(Action.END, tuple(w for w, _ in ended), tuple(e for _, e in ended))
            wait = self.until_due(line, running, now)
            if wait <= 0 and (chosen := self._choose(line, running, budget, now)) is not None:
                return chosen
            if not running.rows:
                return Plan(Action.WAIT, wait_s=wait if wait > 0 else POLL_S)
        return Plan(Action.STEP) if running.rows else Plan(Action.WAIT)

    @staticmethod
    def _ending(waiting: Waiting, wall: float, is_cancelled: Callable[[str], bool]) -> Ending | None:
        if waiting.expired(wall):
            return Ending.EXPIRED
        return Ending.CANCELLED if not waiting.resumed and is_cancelled(waiting.job_id) else None

    def _plan_stopping(self, line: WaitingLine, running: Running, budget: int) -> Plan:
        turned_away = tuple(w for w in line if not w.resumed)
        if turned_away:
            return Plan(Action.END, turned_away, (Ending.SHUTDOWN,) * len(turned_away))
        if len(line) and not running.alone and line.first_alone() is None and (joining := self.joining(line, running, budget)):
            return Plan(Action.JOIN, tuple(joining))
        return Plan(Action.STEP) if running.rows else Plan(Action.STOP)

    def until_due(self, line: WaitingLine, running: Running, now: float) -> float:
        """Seconds until the waiting jobs should be taken in (≤ 0: now)."""
        if self.wait_s <= 0:
            return 0.0
        first, last = line[0], line[len(line) - 1]
        if first.resumed or len(line) >= self.max_size - running.jobs or line.first_alone() is not None:
            return 0.0
        return min(first.arrived + self.max_delay_s, last.arrived + self.wait_s) - now

    def _choose(self, line: WaitingLine, running: Running, budget: int, now: float) -> Plan | None:
        if running.alone:
            return None
        alone = line.first_alone()
        if alone is not None and (running.rows or running.outcomes_unrecorded):
            return None  # the decoding batch drains and its outcomes are recorded, then it runs alone
        anchor = alone or line[0]
        if anchor.key is not None:
            return Plan(Action.GENERATE, tuple(self.generate_group(line, anchor, budget)))
        joining = [anchor] if alone is not None else self.joining(line, running, budget, now)
        return Plan(Action.JOIN, tuple(joining)) if joining else None

    def joining(self, line: WaitingLine, running: Running, budget: int, now: float | None = None) -> list[Waiting]:
        """Waiting jobs that join the decoding batch now, in the order of ``join_order``."""
        jobs, lanes = running.jobs, list(running.lanes)
        joining: list[Waiting] = []
        for waiting in self.join_order(line, now):
            if waiting.key is not None:
                continue  # beam sampling waits for its turn as the first waiting job
            if self.yields(waiting, now):
                fewest = min([rows for priority, rows in running.decoding if priority <= waiting.priority] + [j.rows for j in joining],
                             default=waiting.rows)
                if waiting.rows > fewest:
                    continue  # the jobs of fewer rows (of its priority or a higher one) decode first
            if jobs + len(joining) >= (self.interactive_size if waiting.priority == INTERACTIVE else self.max_size):
                break
            _, lanes_after = place(lanes, waiting.rows, waiting.length, waiting.new_tokens, waiting.rows * waiting.length)
            if lanes_cost(lanes_after) > budget and (joining or jobs):
                break
            joining.append(waiting)
            lanes = lanes_after
        return joining

    def yields(self, waiting: Waiting, now: float | None) -> bool:
        """Whether a waiting job still lets jobs of fewer rows go first (``now`` None: no job does)."""
        return now is not None and waiting.rows > 1 and not waiting.resumed and now - waiting.arrived < self.yield_s

    def join_order(self, line: WaitingLine, now: float | None) -> list[Waiting]:
        """The line's order, except that within a priority the jobs of several rows that have waited less
        than ``yield_s`` come after those of fewer rows (``now`` None: none yields)."""
        def key(item: tuple[int, Waiting]) -> tuple:
            position, w = item
            return (not w.resumed, w.priority, w.rows if self.yields(w, now) else 1, position)

        return [w for _, w in sorted(enumerate(line), key=key)]

    def generate_group(self, line: WaitingLine, anchor: Waiting, budget: int) -> list[Waiting]:
        """The anchor and the waiting jobs that share its generate() call."""
        if anchor.alone:
            return [anchor]
        group = sorted((w for w in line if w.key == anchor.key and not w.alone), key=lambda w: w.length)
        # A window of max_size jobs (in prompt-length order) that holds the anchor, at one end of the
        # group when it can, so that what is left over stays one contiguous run for the next call.
        at = group.index(anchor)
        start = min(max(0, at - self.max_size + 1) if at >= self.max_size else 0, max(0, len(group) - self.max_size), at)
        window = group[start:start + self.max_size]
        # Then trim from the side farther from the anchor until the budget and padding rules hold.
        chosen = [anchor]
        for candidate in sorted(window, key=lambda w: abs(w.length - anchor.length)):
            if candidate is anchor or len(chosen) >= self.max_size:
                continue
            trial = [*chosen, candidate]
            if batch_cost(trial) <= budget and padding_efficiency(trial) >= PADDING_EFFICIENCY:
                chosen.append(candidate)
        return chosen
