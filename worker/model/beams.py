"""Beam search for one job of the continuous decoding batch, with the semantics of transformers'
``generate()`` (its vectorised ``_beam_search``), so that a job's sequences, finish reasons and
scores are the ones ``generate()`` gives it alone.

A beam job holds ``num_beams`` rows of the batch. At each step, over the processed log-probabilities
of its rows (log-softmax first, then the job's processors), the ``2 × num_beams`` best continuations
of all its beams are taken; those that end (EOS, ``max_new_tokens``, a stop string) may become
finished hypotheses (the best ``num_beams`` by score / length ** ``length_penalty``), the best
``num_beams`` that go on become the next beams. ``BeamSearch.step`` returns, per beam, the beam it
continues and its token: the decoding batch then moves its rows' caches and tokens accordingly.

The arithmetic (the -1e9 that marks what cannot be chosen, the order of additions, ``topk`` over
the same shapes) is transformers' own, so that ties break the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

NEG = -1.0e9  # a score that can never be chosen over a real one (transformers' value)


@dataclass(frozen=True)
class Hypothesis:
    """A sequence beam search may return: its generated tokens (EOS included when it ended so),
    the processed log-probability of each, and its score."""

    tokens: list[int]
    logprobs: list[float]
    score: float


@dataclass(frozen=True)
class Continuation:
    """What beam ``i`` becomes after a step: beam ``parent`` of the step before, then ``token``."""

    parent: int
    token: int
    logprob: float  # the token's processed log-probability (output_scores)


@dataclass(frozen=True)
class BeamStep:
    """A step's outcome, not yet applied: the next beams and the search's state after them."""

    beams: list[Continuation]
    running: torch.Tensor
    scores: torch.Tensor
    finished: torch.Tensor
    hypotheses: list[Hypothesis]
    improvable: torch.Tensor
    done: bool


class BeamPath(Protocol):
    """What a beam has generated: the decoding batch's row for it."""

    tokens: list[int]
    logprobs: list[float]


class BeamSearch:
    def __init__(self, num_beams: int, *, length_penalty: float, early_stopping: bool | str, max_new_tokens: int,
                 eos_token_id: int | None, device: torch.device):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id
        self.device = device
        # Only the first beam's continuations count at the first step: the beams start identical.
        self.running = torch.full((1, num_beams), NEG, device=device)
        self.running[0, 0] = 0.0
        self.scores = torch.full((1, num_beams), NEG, device=device)  # of the hypotheses, best first
        self.finished = torch.zeros((1, num_beams), dtype=torch.bool, device=device)
        self.hypotheses = [Hypothesis([], [], NEG)] * num_beams
        self.improvable = torch.ones((1, 1), dtype=torch.bool, device=device)  # transformers' is_early_stop_heuristic_unsatisfied
        self.candidate_mask = torch.cat([torch.ones(num_beams, dtype=torch.bool), torch.zeros(num_beams, dtype=torch.bool)]).to(device)
        self.done = False

    def step(self, log_probs: torch.Tensor, beams: Sequence[BeamPath], stops: Callable[[list[int]], bool] | None) -> BeamStep | None:
        """One step over the beams' processed log-probabilities ``[num_beams, vocab]``: the next beams
        and the state after them, applied by ``commit`` (nothing changes before). None when no
        continuation has a finite score (the job cannot go on). ``stops(tokens)``: whether a
        sequence's text holds a stop string."""
        beams_to_keep = 2 * self.num_beams
        vocab = log_probs.shape[-1]
        accumulated = (log_probs + self.running[0, :, None]).reshape(1, -1)
        top_scores, top_indices = torch.topk(accumulated, k=beams_to_keep)
        if not bool(torch.isfinite(top_scores[0, 0])):
            return None
        parents = (top_indices // vocab)[0].tolist()
        tokens = (top_indices % vocab)[0].tolist()
        token_logprobs = log_probs.reshape(-1)[top_indices[0]].tolist()
        generated = len(beams[0].tokens) + 1
        ends = [token == self.eos_token_id or generated >= self.max_new_tokens or (stops is not None and stops([*beams[parent].tokens, token]))
                for parent, token in zip(parents, tokens, strict=True)]
        hits = torch.tensor([ends], dtype=torch.bool, device=self.device)

        # The best continuations that go on are the next beams.
        going_on = top_scores + hits.to(torch.float32) * NEG
        next_indices = torch.topk(going_on, k=self.num_beams)[1]
        running = torch.gather(going_on, 1, next_indices)

        # Those that ended among the best num_beams may replace finished hypotheses.
        just_finished = hits & self.candidate_mask[None, :]
        candidates = top_scores / (generated**self.length_penalty)
        full = torch.all(self.finished, dim=-1, keepdim=True) & (self.early_stopping is True)
        candidates += full.to(torch.float32) * NEG
        candidates += (~self.improvable).to(torch.float32) * NEG
        candidates += (~just_finished) * NEG
        kept, scores, hypotheses = self._merge(candidates, lambda c, score: Hypothesis(
            [*beams[parents[c]].tokens, tokens[c]], [*beams[parents[c]].logprobs, token_logprobs[c]], score))
        finished = torch.gather(torch.cat((self.finished, just_finished), dim=1), 1, kept)

        improvable = self._improvable(generated, running, scores, finished)
        open_beams = not (bool(torch.all(finished)) and self.early_stopping is True)
        done = not (bool(improvable.any()) and open_beams and not all(ends))
        continuations = [Continuation(parents[k], tokens[k], token_logprobs[k]) for k in next_indices[0].tolist()]
        return BeamStep(continuations, running, scores, finished, hypotheses, improvable, done)

    def commit(self, step: BeamStep) -> None:
        self.running, self.scores, self.finished = step.running, step.scores, step.finished
        self.hypotheses, self.improvable, self.done = step.hypotheses, step.improvable, step.done

    def _improvable(self, generated: int, running: torch.Tensor, scores: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        """Whether the best running beam may still beat the worst hypothesis (transformers'
        ``_check_early_stop_heuristic``)."""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_new_tokens
        else:
            best_length = generated
        best_running = running[:, :1] / (best_length**self.length_penalty)
        worst_finished = torch.where(finished, torch.min(scores, dim=1, keepdim=True)[0], NEG)
        return self.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)

    def stop(self, beams: Sequence[BeamPath]) -> None:
        """End now (cancelled): the running beams count as finished as they stand."""
        generated = len(beams[0].tokens)
        self.done = True
        if generated == 0:  # nothing generated yet: empty sequences
            self.hypotheses = [Hypothesis([], [], 0.0)] * self.num_beams
            return
        _, self.scores, self.hypotheses = self._merge(self.running / (generated**self.length_penalty),
                                                      lambda c, score: Hypothesis(list(beams[c].tokens), list(beams[c].logprobs), score))

    def _merge(self, candidates: torch.Tensor, hypothesis: Callable[[int, float], Hypothesis]) -> tuple[torch.Tensor, torch.Tensor, list[Hypothesis]]:
        """The best ``num_beams`` of the hypotheses and the ``candidates`` (their scores, ``[1, k]``): their
        places in the merge, their scores, and the hypotheses (``hypothesis(c, score)`` makes candidate c's)."""
        merged = torch.cat((self.scores, candidates), dim=1)
        kept = torch.topk(merged, k=self.num_beams)[1]
        scores = torch.gather(merged, 1, kept)
        hypotheses = [self.hypotheses[k] if k < self.num_beams else hypothesis(k - self.num_beams, score)
                      for k, score in zip(kept[0].tolist(), scores[0].tolist(), strict=True)]
        return kept, scores, hypotheses

    def best(self, n: int) -> list[Hypothesis]:
        """The ``n`` best hypotheses, best first."""
        return self.hypotheses[:n]
