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
from worker.costs import tokens_held
from worker.model.beams import BeamSearch, BeamStep
from worker.model.detokenize import IncrementalText, JobStream, cut_at_stop
from worker.model.grammar import apply_masks, new_matcher
from worker.model.kv_cache import KVArena
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
TRIM_AT = 64  # columns of padding shared by every row at which the arena drops them
SHARED_PREFIX_MIN = 16  # prompt tokens that the rows of a prefill call all start with, worth computing once
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


def shared_prefix(inputs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of ``inputs`` share, leaving each at least one token of its own
    (its last position gives its first logits)."""
    first, most = inputs[0], min(len(x) for x in inputs) - 1
    n = 0
    while n < most and all(x[n] == first[n] for x in inputs):
        n += 1
    return n


class DecodeBatch:
    """The decoding rows: slot i of the arena and row i of ``mask``, ``seen`` and ``logits`` belong
    to ``rows[i]``."""

    def __init__(self, engine):
        self.engine = engine
        self.arena = KVArena(engine.num_layers)
        self.rows: list[Row] = []
        self.length = 0  # columns in use; a row's next token goes in this column
        device = engine.device
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)  # [rows, column capacity]
        self.seen = torch.zeros((0, engine.vocab_size), dtype=torch.bool, device=device)  # tokens each row holds
        self.logits = torch.zeros((0, engine.vocab_size), device=device)  # what each row's next token is chosen from
        self.params = RowParameters.of([], device)
        self.adapters: list[str | None] = []  # each row's adapter, as the model call takes them
        self.generators: list[torch.Generator | None] = []
        self.beam_slots: dict[ActiveJob, list[int]] = {}  # each beam search job's slots, by beam
        self.beam_index: torch.Tensor | None = None  # the beams' slots; None when no row is a beam
        self.scored: list[int] = []  # greedy and sampling rows whose job asked for output_scores
        self.constrained: list[int] = []  # rows with a grammar matcher

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def jobs(self) -> list[ActiveJob]:
        """The batch's jobs (each once)."""
        return list(dict.fromkeys(r.active for r in self.rows))

    def cost(self) -> int:
        return tokens_held(len(self.rows), self.length, max((r.remaining for r in self.rows), default=0))

    def cost_with(self, rows: Sequence[Row]) -> int:
        """The cost once ``rows`` have joined."""
        everyone = [*self.rows, *rows]
        return tokens_held(len(everyone), max([self.length] + [len(r.inputs) for r in rows]), max(r.remaining for r in everyone))

    # --- membership ---

    @torch.inference_mode()
    def join(self, groups: Sequence[Sequence[Row]]) -> None:
        """Prefill each group in one call, into free rows. If this raises, no row has joined (the
        running rows may have moved right, which changes nothing they compute)."""
        n = len(self.rows)
        length = max([self.length] + [len(r.inputs) for g in groups for r in g])
        joining = [r for g in groups for r in g]
        columns = length + max(r.remaining for r in [*self.rows, *joining])
        self._reserve(n + len(joining), columns, shift=length - self.length if n else 0)
        self.length = length
        try:
            self._join(groups, n)
        except BaseException:
            if n == 0:
                self.length = 0
            raise

    def _join(self, groups: Sequence[Sequence[Row]], n: int) -> None:
        device = self.engine.device
        masks, logits, placed = [], [], []
        at = n
        for group in groups:
            group_rows, group_mask, group_logits = self._prefill(group, at)
            placed += group_rows
            masks.append(group_mask)
            logits.append(group_logits)
            at += len(group_rows)
        seen = torch.zeros((len(placed), self.seen.shape[1]), dtype=torch.bool, device=device)
        for i, row in enumerate(placed):
            seen[i, torch.tensor(row.inputs, device=device)] = True
        self.mask = torch.cat([self.mask[:n], *masks])
        self.logits = torch.cat([self.logits[:n], *logits])
        self.seen = torch.cat([self.seen[:n], seen])
        self.rows += placed
        self._rows_changed()

    def _prefill(self, group: Sequence[Row], at: int) -> tuple[list[Row], torch.Tensor, torch.Tensor]:
        """Prefill ``group`` into rows ``at``…, right-aligned at the current column. Rows of one job
        that starts fresh share one input: it is computed once and its row copied. Returns the rows
        in the order they were placed, their mask rows and logits."""
        firsts, copies, source = [], [], {}
        for row in group:
            key = (id(row.active), -1 if not row.tokens else id(row))
            if key in source:
                copies.append((row, source[key]))
            else:
                source[key] = len(firsts)
                firsts.append(row)
        width = max(len(r.inputs) for r in firsts)
        start = self.length - width
        adapters = [r.active.job.request.adapter for r in firsts]
        # A prefix every row starts with (a chat template's system message) is computed once, in the first
        # row, and its keys and values copied to the others; the rest of each row follows it, right-aligned
        # (keys carry their positions, so the gap of padding between the two parts is only masked out).
        prefix = shared_prefix([r.inputs for r in firsts]) if len(firsts) > 1 and len(set(adapters)) == 1 else 0
        if prefix < SHARED_PREFIX_MIN:
            prefix = 0
        else:
            ids = torch.tensor([firsts[0].inputs[:prefix]], dtype=torch.long, device=self.engine.device)
            self.engine.forward(ids, torch.ones_like(ids), self.arena.view(slice(at, at + 1), start, start), adapters[:1])
            self.arena.copy_columns(at, slice(at + 1, at + len(firsts)), start, start + prefix)
        rest = width - prefix
        input_ids = torch.full((len(firsts), rest), self.engine.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(firsts), width), dtype=torch.long)
        attention[:, :prefix] = 1
        for i, row in enumerate(firsts):
            own = row.inputs[prefix:]
            input_ids[i, rest - len(own):] = torch.tensor(own, dtype=torch.long)
            attention[i, width - len(own):] = 1
        input_ids, attention = input_ids.to(self.engine.device), attention.to(self.engine.device)
        logits = self.engine.forward(input_ids, attention, self.arena.view(slice(at, at + len(firsts)), start, start + prefix), adapters)
        self.arena.zero(slice(at, at + len(firsts)), start)
        for k, (_, first) in enumerate(copies):
            self.arena.move_row(at + first, at + len(firsts) + k, self.length)
        picked = list(range(len(firsts))) + [first for _, first in copies]
        mask = torch.zeros((len(picked), self.mask.shape[1]), dtype=torch.long, device=attention.device)
        mask[:, start:self.length] = attention[picked]
        return firsts + [row for row, _ in copies], mask, logits[picked]

    @torch.inference_mode()
    def remove(self, leaving: Sequence[Row]) -> None:
        """Take these rows out: each freed slot takes the last row."""
        gone = {id(r) for r in leaving}
        order = list(range(len(self.rows)))  # order[slot] = the old slot now there
        for slot in sorted((i for i, r in enumerate(self.rows) if id(r) in gone), reverse=True):
            last = len(order) - 1
            if slot != last:
                self.arena.move_row(order[last], slot, self.length)
                order[slot] = order[last]
            order.pop()
        self.rows = [self.rows[i] for i in order]
        picked = torch.tensor(order, dtype=torch.long, device=self.mask.device)
        self.mask, self.seen, self.logits = self.mask[picked], self.seen[picked], self.logits[picked]
        self._rows_changed()
        self._trim()

    def _trim(self) -> None:
        """Drop the leading columns that are padding in every row, once there are TRIM_AT of them."""
        if not self.rows:
            self.length = 0
            return
        shared = int((self.mask[:, : self.length].cumsum(-1) == 0).sum(-1).min())
        if shared >= TRIM_AT:
            self._reserve(len(self.rows), self.arena.column_capacity, shift=-shared)
            self.length -= shared

    def _reserve(self, rows: int, columns: int, *, shift: int = 0) -> None:
        n = len(self.rows)
        self.arena.reserve(rows, columns, live=n, length=self.length, shift=shift)
        capacity = self.arena.column_capacity
        if shift or self.mask.shape[1] != capacity:
            mask = torch.zeros((n, capacity), dtype=torch.long, device=self.mask.device)
            if shift >= 0:
                mask[:, shift:shift + self.length] = self.mask[:n, : self.length]
            else:
                mask[:, : self.length + shift] = self.mask[:n, -shift:self.length]
            self.mask = mask

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
        into = torch.tensor(targets, dtype=torch.long, device=self.mask.device)
        taken = torch.tensor(sources, dtype=torch.long, device=self.mask.device)
        both = torch.cat([into, taken])  # the sources' real columns may start before the targets'
        start = int((self.mask[both, : self.length].cumsum(-1) == 0).sum(-1).min()) if self.length else 0
        mask, seen = self.mask[taken], self.seen[taken]  # read before anything is written
        self.arena.copy_rows(targets, sources, start, self.length)
        self.mask[into] = mask
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
        """Run the model on every row's last token; a call that fails leaves the batch as it was."""
        n, length = len(self.rows), self.length
        if length >= self.arena.column_capacity:
            self._reserve(n, length + 1)
        self.mask[:, length] = 1
        tokens = torch.tensor([[r.tokens[-1]] for r in self.rows], dtype=torch.long, device=self.mask.device)
        try:
            self.logits = self.engine.forward(tokens, self.mask[:, : length + 1], self.arena.view(slice(0, n), 0, length),
                                              self.adapters, cost=self.cost())
        except BaseException:
            self.mask[:, length] = 0
            raise
        self.length = length + 1
