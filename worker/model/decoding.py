"""Continuous batching of the jobs decoded one token at a time: greedy, sampling and beam search.

The ``DecodeBatch`` holds one row per returned sequence of each greedy or sampling job, and one row
per beam of each beam search job. A step chooses every row's next token with its own job's
parameters (logits.py) and notes the rows that finished (EOS, length, a stop string); finished rows
leave at once, and the model runs once on the chosen tokens of the others for their next logits.
A beam search job's rows step together (beams.py): after each step its rows take the caches and
tokens of the beams they continue (only its own rows move), and they leave together when its
search ends. Jobs join between steps: their prompts are prefilled (grouped
by length, so that little of a prefill is padding) straight into free rows of the KV arena
(kv_cache.py). A job's rows may also be set aside with their tokens and rejoin later (after running
out of memory): their prompt and tokens are prefilled again, nothing is generated twice.

Every method runs on the one thread that owns the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from producer.records import FinishReason, StreamChunk
from worker.costs import LaneShape, lanes_cost, place
from worker.model.beams import BeamSearch, BeamStep
from worker.model.detokenize import IncrementalText, JobStream, cut_at_stop
from worker.model.grammar import apply_masks, new_matcher
from worker.model.kv_cache import KVArena
from worker.model.lane_attention import LanesStep
from worker.model.lanes import Lane
from worker.model.prefix_cache import PrefixCache
from worker.model.logits import (
    NgramIndex,
    RowParameters,
    apply_processors,
    choose,
    logprobs_of,
)

if TYPE_CHECKING:
    from worker.model.engine import PreparedJob

PREFILL_EFFICIENCY = 0.8  # real tokens / padded tokens of one prefill call, at least
SEED_STRIDE = 0x9E3779B97F4A7C15  # spreads the seeds of one job's returned sequences


@dataclass(eq=False)
class Row:
    """One returned sequence of a job being decoded."""

    active: ActiveJob
    index: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None
    ngrams: NgramIndex | None = None
    text: IncrementalText | None = None  # kept for streaming jobs and jobs with stop strings
    generator: torch.Generator | None = None  # a seeded sampling row's own random stream
    matcher: Any = None  # a constrained row's grammar matcher (grammar.py)

    @property
    def inputs(self) -> list[int]:
        """What a prefill of this row reads: the prompt and the tokens the row generated before it was
        set aside."""
        return self.active.job.input_ids + self.tokens

    @property
    def held(self) -> int:
        """The tokens its cache holds once prefilled (its inputs' length)."""
        return len(self.active.job.input_ids) + len(self.tokens)

    @property
    def remaining(self) -> int:
        return self.active.job.max_new_tokens - len(self.tokens)


@dataclass(frozen=True)
class StepResult:
    """What one step chose: the rows that finished (still in the batch until removed) and the chunks the
    streaming rows have to publish."""

    finished: list[Row]
    chunks: list[StreamChunk]


@dataclass(eq=False)
class ActiveJob:
    """A job from its first admission to a batch until all its rows finished."""

    job: PreparedJob
    rows: list[Row]
    stream: JobStream | None
    started: float
    peak_jobs: int = 1
    cancelled: bool = False
    joined: int = 0  # when it last joined (a batch-wide counter): jobs are set aside last-joined first
    error: str | None = None  # the job failed while decoding (the model gave it no usable scores)
    first_token_at: float | None = None  # perf_counter when its first token was chosen
    beams: BeamSearch | None = None  # a beam search job's search (its rows are its beams, rows[i] beam i)

    @classmethod
    def start(cls, job, engine, *, streaming: bool, stream_interval_s: float = 0.0) -> ActiveJob:
        """``engine``: the ``Engine`` it runs on (its tokenizer's EOS, its device, its decoder)."""
        request, decode, device = job.request, engine.decode, engine.device
        stream = JobStream(job.job_id, job.attempt, request.num_return_sequences, request.stop, stream_interval_s) if streaming else None
        active = cls(job, [], stream, time.perf_counter())
        if request.num_beams > 1:
            active.beams = BeamSearch(request.num_beams, length_penalty=request.length_penalty, early_stopping=request.early_stopping,
                                      max_new_tokens=job.max_new_tokens, eos_token_id=engine.eos_token_id, device=device)
        for index in range(request.num_beams if active.beams is not None else request.num_return_sequences):
            row = Row(active, index)
            if request.do_sample and request.seed is not None:
                # Each row draws from its own stream, so its text depends on the seed and its index only,
                # not on which rows decode beside it or in what order.
                row.generator = torch.Generator(device=device)
                row.generator.manual_seed((request.seed + index * SEED_STRIDE) % 2**63)
            if request.no_repeat_ngram_size:
                row.ngrams = NgramIndex(request.no_repeat_ngram_size, job.input_ids)
            if job.grammar is not None:
                row.matcher = new_matcher(job.grammar)
            if (streaming or request.stop) and active.beams is None:  # beams check stop strings on their whole text
                row.text = IncrementalText(decode)
            active.rows.append(row)
        return active

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def live_rows(self) -> list[Row]:
        return [r for r in self.rows if r.finish is None]

    @property
    def finished(self) -> bool:
        return all(row.finish is not None for row in self.rows)

    def cancel(self) -> None:
        self.cancelled = True
        if self.beams is not None:
            self.beams.stop(self.rows)
        for row in self.live_rows:
            row.finish = FinishReason.CANCELLED

    def fail(self, error: str) -> None:
        self.error = error
        for row in self.live_rows:
            row.finish = FinishReason.FAILED


def prefill_groups(rows: Sequence[Row], max_rows: int, max_tokens: int) -> list[list[Row]]:
    """Rows grouped for prefill calls: by input length, each group at least PREFILL_EFFICIENCY real
    tokens, at most ``max_rows`` rows and ``max_tokens`` padded tokens (a longer row goes alone)."""
    groups: list[list[Row]] = []
    for row in sorted(rows, key=lambda r: len(r.inputs)):
        group = groups[-1] if groups else None
        if group is not None and len(group) < max_rows and (len(group) + 1) * len(row.inputs) <= max_tokens:
            real = sum(len(r.inputs) for r in group) + len(row.inputs)
            if real >= PREFILL_EFFICIENCY * (len(group) + 1) * len(row.inputs):
                group.append(row)
                continue
        groups.append([row])
    return groups


class DecodeBatch:
    """The decoding rows, in lanes (lanes.py): ``rows`` are the lanes' rows, lane after lane, and row i
    of ``seen``, ``logits`` and the per-row parameters belongs to ``rows[i]``."""

    def __init__(self, engine, *, prefix_cache_tokens: int = 0):
        self.engine = engine
        self.prefixes = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.lanes: list[Lane] = [Lane(engine, prefixes=self.prefixes)]  # one lane is kept when the batch is empty, with its arena
        self._spare: KVArena | None = None  # the arena of the last lane that emptied, for the next new lane
        self.filling: list[Lane] = []  # lanes of their own whose job's prompt is prefilled in chunks, first come first
        self.rows: list[Row] = []
        self._slots: list[tuple[Lane, int]] = []  # each row's lane and slot in it
        device = engine.device
        self.seen = torch.zeros((0, engine.vocab_size), dtype=torch.bool, device=device)  # tokens each row holds
        self.logits = torch.zeros((0, engine.vocab_size), device=device)  # what each row's next token is chosen from
        self.params = RowParameters.of([], device)
        self.adapters: list[str | None] = []  # each row's adapter, as the model call takes them
        self.generators: list[torch.Generator | None] = []
        self.beam_slots: dict[ActiveJob, list[int]] = {}  # each beam search job's rows, by beam
        self.beam_index: torch.Tensor | None = None  # the beams' rows; None when no row is a beam
        self.scored: list[int] = []  # greedy and sampling rows whose job asked for output_scores
        self.constrained: list[int] = []  # rows with a grammar matcher

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def jobs(self) -> list[ActiveJob]:
        """The batch's jobs (each once)."""
        return list(dict.fromkeys(r.active for r in self.rows))

    @property
    def length(self) -> int:
        """The columns of its widest lane."""
        return max(lane.length for lane in self.lanes)

    def shapes(self) -> list[LaneShape]:
        """Its lanes' shapes, and those of the lanes being filled as they will be."""
        return [lane.shape() for lane in [*self.lanes, *self.filling] if len(lane) or lane.filling]

    def describe(self) -> str:
        """Its lanes as rows × columns."""
        return ", ".join(f"{len(lane)}×{lane.length}" for lane in self.lanes if len(lane)) or "empty"

    def cost(self) -> int:
        """What its lanes hold at their longest (the lanes being filled as they will be)."""
        return lanes_cost(self.shapes())

    def cost_with(self, groups: Sequence[Sequence[Row]]) -> int:
        """The cost once these prefill groups have joined."""
        return lanes_cost(self._placement(groups)[1]) + lanes_cost([lane.shape() for lane in self.filling])

    def release(self) -> None:
        """Give every arena's buffers back (after running out of memory, or when asked to)."""
        for lane in [*self.lanes, *self.filling]:
            lane.release()
            lane.filled = 0  # a prompt being filled starts again
        self.shed()

    # --- membership ---

    def _placement(self, groups: Sequence[Sequence[Row]]) -> tuple[list[tuple[list[Row], int]], list[LaneShape]]:
        """Each job's lane (an index of ``lanes``, or past them for a new lane), jobs placed whole and in
        the groups' order (as the policy places them); the groups split by lane; the lanes' shapes after."""
        shapes = [lane.shape() for lane in self.lanes]
        jobs: dict[int, list[Row]] = {}  # each job's rows, jobs in the groups' order
        for row in (r for g in groups for r in g):
            jobs.setdefault(id(row.active), []).append(row)
        lane_of: dict[int, int] = {}
        for job, rows in jobs.items():
            lane_of[job], shapes = place(shapes, len(rows), max(r.held for r in rows), max(r.remaining for r in rows), sum(r.held for r in rows))
        split: list[tuple[list[Row], int]] = []
        for group in groups:
            parts: dict[int, list[Row]] = {}
            for row in group:
                parts.setdefault(lane_of[id(row.active)], []).append(row)
            split += [(rows, at) for at, rows in parts.items()]
        return split, shapes

    @torch.inference_mode()
    def join(self, groups: Sequence[Sequence[Row]]) -> None:
        """Prefill each group in one call, into free slots of its jobs' lane (a job's rows all go to one
        lane). If this raises, no row has joined (running rows may have moved right, which changes
        nothing they compute)."""
        split, _ = self._placement(groups)
        lanes = list(self.lanes)
        while len(lanes) <= max(at for _, at in split):
            lanes.append(Lane(self.engine, self._spare, self.prefixes))
            self._spare = None
        by_lane: dict[int, list[Sequence[Row]]] = {}
        for group, at in split:
            by_lane.setdefault(at, []).append(group)
        device = self.engine.device
        joined: list[tuple[Lane, list[Row], torch.Tensor]] = []
        try:
            for at, lane_groups in by_lane.items():
                placed, logits = lanes[at].join(lane_groups)
                joined.append((lanes[at], placed, logits))
            placed = [r for _, rows, _ in joined for r in rows]
            seen = torch.zeros((len(placed), self.seen.shape[1]), dtype=torch.bool, device=device)
            for i, row in enumerate(placed):
                seen[i, torch.tensor(row.inputs, device=device)] = True
            self._keep_lanes(lanes)
            self._regroup(placed, seen, torch.cat([logits for _, _, logits in joined]))
        except BaseException:
            for lane, placed, _ in joined:
                lane.remove({id(r) for r in placed})
            self._keep_lanes(lanes)
            self._regroup([], None, None)  # (the rows' tensors may have been regrouped already)
            raise

    def fills_in_chunks(self, rows: Sequence[Row], chunk: int) -> bool:
        """Whether one job's rows are worth prefilling ``chunk`` tokens at a time (``fill``): a prompt they
        share, of more than ``chunk`` tokens not in the prefix cache."""
        first = rows[0]
        if chunk <= 0 or any(r.tokens for r in rows) or len(first.inputs) <= chunk:
            return False
        cached = self.prefixes.find(first.active.job.request.adapter, first.inputs) if self.prefixes is not None else None
        return len(first.inputs) - (cached[1] if cached else 0) > chunk

    def begin_fill(self, rows: Sequence[Row]) -> None:
        lane = Lane(self.engine, prefixes=self.prefixes)
        lane.begin_fill(list(rows))
        self.filling.append(lane)

    @torch.inference_mode()
    def fill(self, chunk: int) -> list[Row]:
        """The next chunk of the first lane being filled; once its prompt is all in, its rows join the
        decoding rows and are returned. If this raises, that lane is as it was (``abandon_fill`` drops it)."""
        lane = self.filling[0]
        logits = lane.fill(chunk)
        if logits is None:
            return []
        before, spare = list(self.lanes), self._spare
        placed = lane.rows
        try:
            seen = torch.zeros((len(placed), self.seen.shape[1]), dtype=torch.bool, device=self.seen.device)
            seen[:, torch.tensor(placed[0].inputs, device=seen.device)] = True
            self._keep_lanes([*self.lanes, lane])
            self._regroup(placed, seen, logits)
        except BaseException:
            self.lanes, self._spare = before, spare
            lane.unfill()
            self._regroup([], None, None)  # (the rows' tensors may have been regrouped already)
            raise
        self.filling.pop(0)
        return placed

    @property
    def idle(self) -> bool:
        """No row decodes and no prompt is being filled."""
        return not self.rows and not self.filling

    def shed(self) -> None:
        """Drop what holds memory without holding a row: the spare arena and the prefix cache (after
        running out of memory)."""
        self._spare = None
        if self.prefixes is not None:
            self.prefixes.clear()

    def abandon_fill(self, active: ActiveJob) -> None:
        """Stop filling this job's lane (it failed, was cancelled or is set aside), and free its arena."""
        for lane in [x for x in self.filling if x.filling[0].active is active]:
            lane.release()
            self.filling.remove(lane)

    @property
    def filling_jobs(self) -> list[ActiveJob]:
        return [lane.filling[0].active for lane in self.filling]

    @torch.inference_mode()
    def remove(self, leaving: Sequence[Row]) -> None:
        """Take these rows out of their lanes."""
        gone = {id(r) for r in leaving}
        for lane in {id(lane): lane for lane, _ in (self._slots[i] for i, r in enumerate(self.rows) if id(r) in gone)}.values():
            lane.remove(gone)
        self._keep_lanes(self.lanes)
        self._regroup([], None, None)

    def _keep_lanes(self, lanes: list[Lane]) -> None:
        """The lanes with rows (or one empty lane, when none has); an emptied lane's arena is kept as the
        spare (the larger one) for the next new lane."""
        kept = [lane for lane in lanes if len(lane)]
        for lane in lanes:
            if not len(lane) and lane.arena.allocated and (self._spare is None or lane.arena.column_capacity > self._spare.column_capacity):
                self._spare = lane.arena
        if not kept:
            lane = max(lanes, key=lambda x: x.arena.column_capacity * x.arena.row_capacity)
            if lane.arena is self._spare:
                self._spare = None
            kept = [lane]
        self.lanes = kept

    def _regroup(self, joining: list[Row], seen: torch.Tensor | None, logits: torch.Tensor | None) -> None:
        """``rows`` become the lanes' rows, lane after lane; the rows' tensors follow them (``joining``
        rows bring their own)."""
        where = {id(r): i for i, r in enumerate(self.rows)}
        where.update({id(r): len(self.rows) + k for k, r in enumerate(joining)})
        rows = [r for lane in self.lanes for r in lane.rows]
        picked = torch.tensor([where[id(r)] for r in rows], dtype=torch.long, device=self.seen.device)
        all_seen = torch.cat([self.seen, seen]) if joining else self.seen
        all_logits = torch.cat([self.logits, logits]) if joining else self.logits
        self.seen, self.logits = all_seen[picked], all_logits[picked]
        self.rows = rows
        self._slots = [(lane, slot) for lane in self.lanes for slot in range(len(lane))]
        self._rows_changed()

    def _rows_changed(self) -> None:
        self.params = RowParameters.of([r.active.job.request for r in self.rows], self.engine.device)
        self.adapters = [r.active.job.request.adapter for r in self.rows]
        sampling = self.params.sampling.tolist() if self.params.sampling is not None else []
        self.generators = [self.rows[i].generator for i in sampling]
        self.beam_slots = {}
        for i, row in enumerate(self.rows):
            if row.active.beams is not None:
                self.beam_slots.setdefault(row.active, [0] * len(row.active.rows))[row.index] = i
        is_beam = [r.active.beams is not None for r in self.rows]
        beams = [i for i, beam in enumerate(is_beam) if beam]
        self.beam_index = torch.tensor(beams, dtype=torch.long, device=self.engine.device) if beams else None
        self.scored = [i for i in self.params.scored if not is_beam[i]]
        self.constrained = [i for i, r in enumerate(self.rows) if r.matcher is not None]

    # --- a step ---

    @torch.inference_mode()
    def choose(self) -> StepResult:
        """Choose each row's next token; returns the rows that finished (they are still in the batch)
        and the streaming rows' new text. If this raises, nothing has changed (seeded rows' generators
        are put back), so it can be retried."""
        states = [g.get_state() if g is not None else None for g in self.generators]
        try:
            tokens, chosen_from, broken = self._choose_tokens()
            failing = {self.rows[i].active for i in broken}
            beam_steps = {active: active.beams.step(chosen_from[slots], active.rows, self._stop_check(active))
                          for active, slots in self.beam_slots.items() if active not in failing}
            logprobs = logprobs_of(chosen_from, tokens, self.scored)
            self._move_beams(beam_steps)  # last: it writes the beams' rows
        except BaseException:
            for generator, state in zip(self.generators, states, strict=True):
                if generator is not None:
                    generator.set_state(state)
            raise
        for active, step in beam_steps.items():
            if step is None:
                active.fail("no continuation of this beam search job has a finite score (every token forbidden: by no_repeat_ngram_size, "
                            "min_new_tokens or its structured output's grammar); relax those parameters")
            else:
                self._continue_beams(active, step, tokens)
        self.seen[torch.arange(len(self.rows), device=tokens.device), tokens] = True
        chunks: list[StreamChunk] = []
        now = time.monotonic()
        sending = {id(r.active) for r in self.rows if r.active.stream is not None and r.active.stream.due(now)}
        finished = []
        for i in broken:
            self.rows[i].active.fail("the model gave this job no usable next-token scores (NaN, or every token forbidden: by no_repeat_ngram_size, "
                                     "min_new_tokens or its structured output's grammar); if it runs in float16, try bfloat16 or float32, "
                                     "or relax those parameters")
        for i, token in enumerate(tokens.tolist()):
            row = self.rows[i]
            if row.finish is not None:  # its job failed
                finished.append(row)
                continue
            if row.active.beams is not None:  # its tokens moved with its beam; its rows leave when the search ends
                if row.active.beams.done:
                    row.finish = FinishReason.LENGTH  # a mark that it leaves: the job's sequences are its search's hypotheses
                    finished.append(row)
                continue
            row.tokens.append(token)
            if row.matcher is not None and not row.matcher.accept_token(token):
                row.active.fail(f"the grammar of its structured output refused token {token}, which its own mask allowed (a grammar engine bug)")
                finished.append(row)
                continue
            if row.active.first_token_at is None:
                row.active.first_token_at = time.perf_counter()
            if i in logprobs:
                row.logprobs.append(logprobs[i])
            if row.ngrams is not None:
                row.ngrams.add(token)
            if token == self.engine.eos_token_id:
                row.finish = FinishReason.EOS
            elif row.text is not None:
                text = row.text.push(row.tokens)
                request = row.active.job.request
                if request.stop and cut_at_stop(text, request.stop)[1]:
                    row.finish = FinishReason.STOP
                if id(row.active) in sending and (chunk := row.active.stream.advance(row.index, text, len(row.tokens), now=now)):
                    chunks.append(chunk)
            if row.finish is None and row.remaining <= 0:
                row.finish = FinishReason.LENGTH
            if row.finish is not None:
                finished.append(row)
        return StepResult(finished, chunks)

    def _choose_tokens(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Every row's token (a beam's is chosen by its search), the processed scores it was chosen
        from (for beams: log-probabilities, processed after the log-softmax, as generate() does), and
        the rows that cannot choose."""
        generated = torch.tensor([len(r.tokens) for r in self.rows], device=self.logits.device)
        bans = {i: r.ngrams.banned() for i, r in enumerate(self.rows) if r.ngrams is not None}
        logits = self.logits
        if self.beam_index is not None:
            logits = logits.clone()
            logits[self.beam_index] = torch.log_softmax(logits[self.beam_index], dim=-1)
        logits = apply_processors(logits, self.seen, self.params, generated, bans, self.engine.eos_token_id)
        if self.constrained:
            logits = apply_masks(logits, self.constrained, [self.rows[i].matcher for i in self.constrained], self.engine.vocab_size,
                                 self.engine.eos_token_id)
        # A row with no finite score left (or a NaN) cannot choose: it fails alone, its neighbours go on.
        # A beam with every token forbidden only drops out: its search chooses among all its beams.
        no_choice = ~torch.isfinite(logits).any(-1)
        if self.beam_index is not None:
            no_choice[self.beam_index] = False
        unusable = torch.isnan(logits).any(-1) | no_choice
        broken = unusable.nonzero().flatten().tolist()
        if broken:
            logits = logits.clone()
            logits[unusable] = 0.0
        tokens, chosen_from = choose(logits, self.params, self.generators)
        return tokens, chosen_from, broken

    def _stop_check(self, active: ActiveJob) -> Callable[[list[int]], bool] | None:
        stop = active.job.request.stop
        if not stop:
            return None
        decode = self.engine.decode
        return lambda tokens: cut_at_stop(decode(tokens), stop)[1]

    def _move_beams(self, steps: dict[ActiveJob, BeamStep | None]) -> None:
        """Each beam's row takes the cache, mask and seen tokens of the beam it continues (a job's
        rows from its own rows). Raises before changing anything if memory runs out."""
        targets, sources = [], []
        for active, step in steps.items():
            if step is None or step.done:  # its rows leave now
                continue
            slots = self.beam_slots[active]
            for beam, continuation in enumerate(step.beams):
                if continuation.parent != beam:
                    targets.append(slots[beam])
                    sources.append(slots[continuation.parent])
        if not targets:
            return
        into = torch.tensor(targets, dtype=torch.long, device=self.seen.device)
        seen = self.seen[torch.tensor(sources, dtype=torch.long, device=self.seen.device)]  # read before anything is written
        per_lane: dict[int, tuple[Lane, list[int], list[int]]] = {}  # a job's beams are all in one lane
        for target, source in zip(targets, sources, strict=True):
            lane, slot = self._slots[target]
            per_lane.setdefault(id(lane), (lane, [], []))
            per_lane[id(lane)][1].append(slot)
            per_lane[id(lane)][2].append(self._slots[source][1])
        taken = [(lane, slots, lane.read_rows(slots, sources)) for lane, slots, sources in per_lane.values()]
        for lane, slots, read in taken:
            lane.write_rows(slots, read)
        self.seen[into] = seen

    def _continue_beams(self, active: ActiveJob, step: BeamStep, tokens: torch.Tensor) -> None:
        """The job's rows become the beams they continue, each with its new token."""
        active.beams.commit(step)
        if active.first_token_at is None:
            active.first_token_at = time.perf_counter()
        before = [(r.tokens, r.logprobs, r.ngrams, r.matcher) for r in active.rows]
        slots = self.beam_slots[active]
        for row, continuation in zip(active.rows, step.beams, strict=True):
            parent_tokens, parent_logprobs, parent_ngrams, parent_matcher = before[continuation.parent]
            row.tokens = [*parent_tokens, continuation.token]
            row.logprobs = [*parent_logprobs, continuation.logprob]
            if parent_ngrams is not None:
                row.ngrams = parent_ngrams.copy()
                row.ngrams.add(continuation.token)
            if parent_matcher is not None:
                row.matcher = parent_matcher.fork()
                if not row.matcher.is_terminated():
                    # Refused only for a continuation the mask scored -inf (fewer allowed tokens than beams): that
                    # beam can never win, and when no beam has a finite score left its search fails the job.
                    row.matcher.accept_token(continuation.token)
        tokens[slots] = torch.tensor([c.token for c in step.beams], dtype=tokens.dtype, device=tokens.device)

    @torch.inference_mode()
    def forward(self) -> None:
        """Run the model on every row's last token: one call for every lane where the model takes the
        lanes attention, else one call per lane; a call that fails leaves the batch as it was."""
        self.engine.check_memory(self.cost(), f"a decoding step of {len(self.rows)} rows")
        tokens = torch.tensor([[r.tokens[-1]] for r in self.rows], dtype=torch.long, device=self.seen.device)
        lanes = [lane for lane in self.lanes if len(lane)]
        opened = []
        try:
            for lane in lanes:
                lane.open_column()
                opened.append(lane)
            if len(lanes) > 1 and self.engine.lane_attention:  # one call for every lane (lane_attention.py)
                positions = torch.cat([lane.positions() for lane in lanes])[:, None]
                logits = self.engine.forward_lanes(tokens, positions, LanesStep(lanes), self.adapters)
            else:
                parts, at = [], 0
                for lane in lanes:
                    parts.append(lane.forward(tokens[at:at + len(lane)], self.adapters[at:at + len(lane)]))
                    at += len(lane)
                logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        except BaseException:
            for lane in opened:
                lane.undo()
            raise
        for lane in lanes:
            lane.advance()
        self.logits = logits
