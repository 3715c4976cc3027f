"""Choosing every row's next token with its own job's parameters, so that jobs with different
generation parameters share one decoding batch.

The processors are transformers' own definitions, applied per row, in ``generate()``'s order, so
that a greedy row's tokens are the ones ``generate()`` picks for that job alone:
  repetition_penalty → no_repeat_ngram_size → min_new_tokens (EOS held back)
then, for sampling rows only: temperature → top_k → top_p, and a draw. The repetition penalty and
the n-grams count the row's real tokens (prompt and generated), never another row's padding.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from producer.schemas import GenerationRequest

NEG_INF = float("-inf")


class NgramIndex:
    """The n-grams a row holds, to forbid completing one of them again (``no_repeat_ngram_size``)."""

    def __init__(self, n: int, tokens: Sequence[int]):
        self.n = n
        self.tokens: list[int] = []
        self.next_of: dict[tuple[int, ...], set[int]] = defaultdict(set)
        for token in tokens:
            self.add(token)

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if len(self.tokens) >= self.n:
            self.next_of[tuple(self.tokens[len(self.tokens) - self.n:-1])].add(token)

    def copy(self) -> NgramIndex:
        twin = NgramIndex(self.n, [])
        twin.tokens = list(self.tokens)
        twin.next_of = defaultdict(set, {k: set(v) for k, v in self.next_of.items()})
        return twin

    def banned(self) -> list[int]:
        if len(self.tokens) + 1 < self.n:
            return []
        return list(self.next_of.get(tuple(self.tokens[len(self.tokens) - self.n + 1:]), ()))


@dataclass(frozen=True)
class RowParameters:
    """A batch's per-row parameters as tensors; rebuilt whenever its rows change."""

    penalty: torch.Tensor | None  # [rows, 1]; None when no row has a penalty
    min_new_tokens: torch.Tensor  # [rows]
    sampling: torch.Tensor | None  # indices of the sampling rows; None when all are greedy
    temperature: torch.Tensor | None  # [sampling rows, 1]
    top_k: torch.Tensor | None  # [sampling rows]; 0 = off
    top_p: torch.Tensor | None  # [sampling rows, 1]; 1.0 = off
    scored: list[int]  # rows whose job asked for output_scores

    @classmethod
    def of(cls, requests: Sequence[GenerationRequest], device: torch.device) -> RowParameters:
        penalties = [r.repetition_penalty for r in requests]
        sampling = [i for i, r in enumerate(requests) if r.do_sample]
        picked = [requests[i] for i in sampling]
        return cls(
            penalty=torch.tensor(penalties, device=device).unsqueeze(1) if any(p != 1.0 for p in penalties) else None,
            min_new_tokens=torch.tensor([r.min_new_tokens for r in requests], device=device),
            sampling=torch.tensor(sampling, dtype=torch.long, device=device) if sampling else None,
            temperature=torch.tensor([r.temperature for r in picked], device=device).unsqueeze(1) if sampling else None,
            top_k=torch.tensor([r.top_k for r in picked], dtype=torch.long, device=device) if sampling else None,
            top_p=torch.tensor([r.top_p for r in picked], device=device).unsqueeze(1) if sampling else None,
            scored=[i for i, r in enumerate(requests) if r.output_scores],
        )


def apply_processors(logits: torch.Tensor, seen: torch.Tensor, params: RowParameters, generated: torch.Tensor,
                     bans: dict[int, list[int]], eos_token_id: int | None) -> torch.Tensor:
    """Repetition penalty (on the tokens a row has seen), n-gram bans, and EOS held back while a row
    has fewer than min_new_tokens. ``generated``: tokens each row has generated so far."""
    if params.penalty is not None:
        penalised = torch.where(logits < 0, logits * params.penalty, logits / params.penalty)
        logits = torch.where(seen, penalised, logits)
    for row, banned in bans.items():
        if banned:
            logits[row, banned] = NEG_INF
    if eos_token_id is not None:
        early = generated < params.min_new_tokens
        if bool(early.any()):
            logits[early, eos_token_id] = NEG_INF
    return logits


def warp(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Temperature, then top-k (0 = off), then top-p (1.0 = off), per row, as transformers' warpers."""
    logits = logits / temperature
    k_max = int(top_k.max())
    if k_max > 0:
        k = top_k.clamp(max=logits.shape[-1])
        kth = torch.topk(logits, min(k_max, logits.shape[-1]), dim=-1).values.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
        kth = torch.where(k.unsqueeze(1) > 0, kth, torch.full_like(kth, NEG_INF))
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if bool((top_p < 1.0).any()):
        sorted_logits, sorted_indices = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # keep at least one token
        logits = logits.masked_fill(remove.scatter(1, sorted_indices, remove), NEG_INF)
    return logits


def choose(logits: torch.Tensor, params: RowParameters, generators: Sequence[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(next token per row, the logits each was chosen from): greedy rows take the argmax, sampling
    rows draw after warping, with their job's generator when it was seeded (``generators`` holds
    one entry per sampling row)."""
    tokens = logits.argmax(dim=-1)
    if params.sampling is None:
        return tokens, logits
    chosen_from = logits.clone()
    warped = warp(logits[params.sampling], params.temperature, params.top_k, params.top_p)
    chosen_from[params.sampling] = warped
    probs = warped.softmax(dim=-1)
    drawn = torch.empty(len(generators), dtype=torch.long, device=logits.device)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        drawn[shared] = torch.multinomial(probs[shared], 1).squeeze(1)
    for i, generator in enumerate(generators):
        if generator is not None:
            drawn[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
    tokens[params.sampling] = drawn
    return tokens, chosen_from


def logprobs_of(chosen_from: torch.Tensor, tokens: torch.Tensor, rows: list[int]) -> dict[int, float]:
    """Log-probability of each row's token under the distribution it was chosen from (as
    transformers' ``compute_transition_scores(normalize_logits=True)``)."""
    if not rows:
        return {}
    index = torch.tensor(rows, device=tokens.device)
    values = torch.log_softmax(chosen_from[index].float(), dim=-1).gather(1, tokens[index].unsqueeze(1)).squeeze(1)
    return dict(zip(rows, values.tolist(), strict=True))
