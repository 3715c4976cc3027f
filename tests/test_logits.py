"""The per-row logits processors against transformers' own, row by row (pure functions)."""

from __future__ import annotations

import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from producer.schemas import parse_request
from worker.model.logits import NgramIndex, RowParameters, apply_processors, choose, logprobs_of, warp

VOCAB = 50
EOS = 2


def requests(*overrides):
    return [parse_request({"prompt": "x", "num_beams": 1, **o}) for o in overrides]


def histories(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def seen_of(ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros((ids.shape[0], VOCAB), dtype=torch.bool).scatter_(1, ids, True)


def test_repetition_penalty_min_new_tokens_and_ngrams_match_transformers_per_row():
    overrides = [{"repetition_penalty": 1.0}, {"repetition_penalty": 1.3, "min_new_tokens": 5}, {"repetition_penalty": 2.0, "no_repeat_ngram_size": 2},
                 {"no_repeat_ngram_size": 3, "min_new_tokens": 1}]
    reqs = requests(*overrides)
    ids = histories(len(reqs), 12)
    prompt = 8  # the last 4 tokens of each history are "generated"
    logits = torch.randn(len(reqs), VOCAB, generator=torch.Generator().manual_seed(1))
    params = RowParameters.of(reqs, torch.device("cpu"))
    bans = {i: NgramIndex(r.no_repeat_ngram_size, ids[i].tolist()).banned() for i, r in enumerate(reqs) if r.no_repeat_ngram_size}
    generated = torch.full((len(reqs),), ids.shape[1] - prompt)
    ours = apply_processors(logits.clone(), seen_of(ids), params, generated, bans, EOS)
    for i, r in enumerate(reqs):
        expected = logits[i:i + 1].clone()
        row = ids[i:i + 1]
        if r.repetition_penalty != 1.0:
            expected = RepetitionPenaltyLogitsProcessor(r.repetition_penalty)(row, expected)
        if r.no_repeat_ngram_size:
            expected = NoRepeatNGramLogitsProcessor(r.no_repeat_ngram_size)(row, expected)
        expected = MinNewTokensLengthLogitsProcessor(prompt, r.min_new_tokens, EOS)(row, expected)
        assert torch.equal(ours[i], expected[0]), i
    assert ours[1, EOS] == float("-inf") and ours[3, EOS] != float("-inf")  # min_new_tokens 5 holds EOS back, 1 does not


def test_warping_matches_transformers_per_row():
    settings = [(0.7, 10, 0.9), (1.0, 0, 1.0), (1.5, 3, 0.5), (0.1, 0, 0.3), (2.0, 50, 0.99)]
    logits = torch.randn(len(settings), VOCAB, generator=torch.Generator().manual_seed(2))
    temperature = torch.tensor([[t] for t, _, _ in settings])
    top_k = torch.tensor([k for _, k, _ in settings])
    top_p = torch.tensor([[p] for _, _, p in settings])
    ours = warp(logits.clone(), temperature, top_k, top_p)
    for i, (t, k, p) in enumerate(settings):
        expected = logits[i:i + 1].clone()
        if t != 1.0:
            expected = TemperatureLogitsWarper(t)(None, expected)
        if k:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1.0:
            expected = TopPLogitsWarper(p)(None, expected)
        assert torch.allclose(ours[i], expected[0], equal_nan=True), (i, ours[i], expected[0])
        assert torch.equal(ours[i].isinf(), expected[0].isinf()), i
    assert (ours[2] > float("-inf")).sum() <= 3 and (ours[1] > float("-inf")).all()


def test_greedy_rows_take_the_argmax_and_seeded_rows_draw_the_same_whatever_their_neighbours():
    reqs = requests({}, {"do_sample": True, "seed": 7, "temperature": 1.0, "top_k": 0, "top_p": 1.0}, {"do_sample": True, "top_k": 1})
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3))
    params = RowParameters.of(reqs, torch.device("cpu"))

    def seeded():
        return torch.Generator().manual_seed(7)

    tokens, chosen_from = choose(logits.clone(), params, [seeded(), None])
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()  # top_k=1 sampling is greedy
    alone, _ = choose(logits[1:2].clone(), RowParameters.of(reqs[1:2], torch.device("cpu")), [seeded()])
    assert tokens[1] == alone[0]
    draws = {int(choose(logits.clone(), params, [torch.Generator().manual_seed(s), None])[0][1]) for s in range(40)}
    assert len(draws) > 5, "different seeds draw different tokens"
    logprobs = logprobs_of(chosen_from, tokens, [0, 2])
    assert logprobs[2] == 0.0  # top_k=1: the only token left is certain
    assert abs(logprobs[0] - float(torch.log_softmax(logits[0], -1).max())) < 1e-6


def test_ngram_index_bans_what_would_repeat_an_ngram():
    index = NgramIndex(2, [5, 6, 5])
    assert index.banned() == [6]
    index.add(7)
    assert index.banned() == []
    assert NgramIndex(3, [1]).banned() == []
