"""Continuous batching and OOM-aware retry, in-process on the real tiny models.

The reference for every output is transformers' own ``generate()`` on the job alone
(``Engine.generate_batch([job])``), the seed's one-request-at-a-time way.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest

from producer.errors import ErrorCode
from producer.records import FinishReason
from producer.schemas import parse_request
from producer.settings import Settings
from tests.waiting import stays, wait_for
from worker.errors import JobFailure
from worker.model.decoding import DecodeBatch
from worker.model.lanes import SHARED_PREFIX_MIN, TRIM_AT, shared_prefix
from worker.model.engine import Engine, batch_cost
from worker.model.kv_cache import KVArena
from worker.model.model_config import ModelConfig
from worker.scheduling.batcher import Batcher
from worker.scheduling.oom import TokenBudget

PROMPTS = [
    "Hi", "你好", "What is machine learning?", "请解释什么是人工智能，并举几个例子说明它在日常生活中的应用。",
    "The quick brown fox jumps over the lazy dog. " * 3, "北京", "写一篇关于环保的短文，不少于三百字，要求结构清晰，语言生动，有具体的建议。",
    "def generate_answer(prompt, max_new_tokens=200):", "🚀🌍😀", "Numbers and dates: 2024-05-01, 3.14159, 100%",
    "温度控制输出的随机性", "Beam search keeps several candidate sequences; sampling draws the next token.",
]
# Parameter sets that greedy jobs of one batch may differ by.
VARIANTS = [{}, {"repetition_penalty": 1.0}, {"no_repeat_ngram_size": 2}, {"min_new_tokens": 12, "max_new_tokens": 12}, {"output_scores": True},
            {"stop": ["a"]}, {"max_new_tokens": 5}, {"repetition_penalty": 1.5, "no_repeat_ngram_size": 3}]
# ... and beam search jobs.
BEAM_VARIANTS = [{}, {"num_return_sequences": 2}, {"length_penalty": 0.5}, {"length_penalty": -1.0, "early_stopping": True},
                 {"early_stopping": "never", "length_penalty": 2.0}, {"no_repeat_ngram_size": 2, "output_scores": True}, {"min_new_tokens": 10},
                 {"stop": ["a"], "num_return_sequences": 3}, {"num_beams": 2, "repetition_penalty": 1.0}, {"num_beams": 5, "num_return_sequences": 3}]


def load(path, **overrides) -> Engine:
    return Engine.load(ModelConfig(name="tiny", path=str(path), context_length=512), "cpu", **overrides)


@pytest.fixture(scope="module", params=["bloom", "llama"])
def engine(request) -> Engine:
    return load(request.getfixturevalue(f"tiny_{request.param}"))


def batcher_for(engine: Engine, **settings) -> Batcher:
    """Jobs of several rows join beside jobs of fewer at once (batch_yield_s 0), so that they decode together."""
    return Batcher(engine, Settings(**{"batch_wait_ms": 50, "batch_max_delay_ms": 500, "batch_yield_s": 0, **settings})).start()


def prepare(engine: Engine, job_id: str, **data):
    return engine.prepare(job_id, parse_request(data))


def alone(engine: Engine, job):
    """The job's sequences from generate() on the job alone."""
    return engine.generate_batch([job])[0].result.sequences


def assert_same_output(batched, reference, job_id):
    """Same tokens, text and finish reasons; log-probabilities and beam scores equal up to the float
    noise between batch shapes."""
    assert [(s.token_ids, s.text, s.finish_reason) for s in batched] == [(s.token_ids, s.text, s.finish_reason) for s in reference], job_id
    for b, r in zip(batched, reference, strict=True):
        if r.logprobs is not None:
            assert b.logprobs == pytest.approx(r.logprobs, abs=1e-3), job_id
        assert (b.score is None) == (r.score is None) and (r.score is None or b.score == pytest.approx(r.score, rel=1e-5, abs=1e-4)), job_id


def run_all(batcher: Batcher, jobs, timeout: float = 120):
    futures = [batcher.submit(job) for job in jobs]
    return {g.job_id: g.result for g in (f.result(timeout=timeout) for f in futures)}


def test_greedy_output_is_the_same_alone_and_in_a_mixed_batch_of_32(engine):
    greedy = [prepare(engine, f"g{i}", **{"prompt": PROMPTS[i % len(PROMPTS)] * (1 + i % 3), "num_beams": 1, "max_new_tokens": 16, **VARIANTS[i % len(VARIANTS)]})
              for i in range(32)]
    others = [
        prepare(engine, "beam", prompt="Hello", num_beams=3, num_return_sequences=2, max_new_tokens=8),
        prepare(engine, "sample", prompt="Hello", do_sample=True, num_beams=1, seed=5, max_new_tokens=8),
    ]
    reference = {job.job_id: alone(engine, job) for job in greedy}
    batcher = batcher_for(engine)
    try:
        results = run_all(batcher, greedy + others)
    finally:
        batcher.stop()
    # The eight parameter sets decoded together, as one batch.
    assert min(results[j.job_id].timings.batch_size for j in greedy) >= 32
    for job in greedy:
        assert_same_output(results[job.job_id].sequences, reference[job.job_id], job.job_id)
    assert results["beam"].timings.batch_size >= 32 and len(results["beam"].sequences) == 2
    assert_same_output(results["beam"].sequences, alone(engine, others[0]), "beam")


def test_beam_search_jobs_join_a_running_batch_and_give_what_generate_gives_them_alone(engine):
    """Beam jobs of every parameter set join greedy and sampling jobs already decoding, and each
    returns the sequences, finish reasons and scores of transformers' beam search on the job alone."""
    first = [prepare(engine, f"g{i}", **{"prompt": PROMPTS[i], "num_beams": 1, "max_new_tokens": 16, "min_new_tokens": 16, **VARIANTS[i % 3]})
             for i in range(4)]
    sampling = prepare(engine, "sample", prompt=PROMPTS[5], do_sample=True, seed=5, num_beams=1, num_return_sequences=2, max_new_tokens=16)
    beams = [prepare(engine, f"b{i}", **{"prompt": PROMPTS[i % len(PROMPTS)], "num_beams": 4, "max_new_tokens": 12, **BEAM_VARIANTS[i % len(BEAM_VARIANTS)]})
             for i in range(20)]
    reference = {job.job_id: alone(engine, job) for job in [*first, *beams]}
    batcher = batcher_for(engine, batch_wait_ms=1, batch_max_delay_ms=5)
    try:
        running = [batcher.submit(job) for job in [*first, sampling]]
        wait_for(lambda: batcher.decoding, 60, "the first jobs decode", poll=0.001)
        results = run_all(batcher, beams)
        results.update({g.job_id: g.result for g in (f.result(timeout=120) for f in running)})
    finally:
        batcher.stop()
    for job in [*first, *beams]:
        assert_same_output(results[job.job_id].sequences, reference[job.job_id], job.job_id)
    assert min(results[job.job_id].timings.batch_size for job in beams) > 1, "the beam jobs decoded beside other jobs"
    assert {len(results[job.job_id].sequences) for job in beams} == {1, 2, 3}
    assert all(s.score is not None for job in beams for s in results[job.job_id].sequences)


def test_cancelling_a_beam_search_job_in_the_batch_ends_it_with_its_best_beams_and_spares_its_mates(tiny_bloom):
    engine = load(tiny_bloom)

    class Cancellations:
        ids: set[str] = set()

        def is_cancelled(self, job_id: str) -> bool:
            return job_id in self.ids

    beam = prepare(engine, "beam", prompt="Hello", num_beams=3, num_return_sequences=2, max_new_tokens=300, min_new_tokens=100)
    mate = prepare(engine, "mate", prompt=PROMPTS[2], num_beams=2, max_new_tokens=40, min_new_tokens=40)
    reference = alone(engine, mate)
    cancellations = Cancellations()
    batcher = Batcher(engine, Settings(batch_wait_ms=1, batch_max_delay_ms=5), cancellations=cancellations).start()
    try:
        futures = {job.job_id: batcher.submit(job) for job in (beam, mate)}
        wait_for(lambda: "beam" in batcher._in_batch and len(batcher._in_batch["beam"].active.rows[0].tokens) >= 5, 60,
                 "the beam job generated 5 tokens", poll=0.001)
        cancellations.ids.add("beam")
        cancelled = futures["beam"].result(timeout=60)
        kept = futures["mate"].result(timeout=60).result
    finally:
        batcher.stop()
    assert cancelled.cancelled and len(cancelled.result.sequences) == 2
    for sequence in cancelled.result.sequences:
        assert sequence.finish_reason is FinishReason.CANCELLED and 5 <= len(sequence.token_ids) < 100
    assert cancelled.result.sequences[0].score >= cancelled.result.sequences[1].score
    assert_same_output(kept.sequences, reference, "mate")


def test_a_prefix_the_rows_share_is_computed_once_and_every_output_stays_the_same(engine, monkeypatch):
    """Jobs with one long system message (a chat template's, in real use) and their own questions: the
    shared prefix is prefilled once and copied, and each job's output is the one it has alone, whether
    it joins with the others or later, beside rows that do not share it."""
    system = {"role": "system", "content": "You are a careful assistant. Answer briefly and politely, in the language of the question."}
    questions = ["Hi", "你好", "What is machine learning?", "北京", "The quick brown fox", "温度控制输出的随机性"]
    shared = [prepare(engine, f"s{i}", **{"messages": [system, {"role": "user", "content": q}], "num_beams": 1, "max_new_tokens": 12,
                                          **VARIANTS[i % len(VARIANTS)]}) for i, q in enumerate(questions)]
    assert shared_prefix([job.input_ids for job in shared]) >= SHARED_PREFIX_MIN, "the test's jobs share a prefix worth sharing"
    own = [prepare(engine, f"o{i}", prompt=PROMPTS[i], num_beams=1, max_new_tokens=12) for i in range(3)]
    reference = {job.job_id: alone(engine, job) for job in shared + own}
    copied = []
    copy_columns = KVArena.copy_columns
    monkeypatch.setattr(KVArena, "copy_columns", lambda self, *args: copied.append(args) or copy_columns(self, *args))
    batcher = batcher_for(engine)
    try:
        results = run_all(batcher, shared[:4] + own)
        results.update(run_all(batcher, shared[4:]))
    finally:
        batcher.stop()
    assert copied, "the shared prefix was copied, not computed for every row"
    for job in shared + own:
        assert_same_output(results[job.job_id].sequences, reference[job.job_id], job.job_id)


def test_shared_prefix_leaves_every_row_a_token_of_its_own():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]]) == 3
    assert shared_prefix([[1, 2], [1, 2, 3]]) == 1, "the shorter one keeps its last token"
    assert shared_prefix([[7, 1], [8, 1]]) == 0 and shared_prefix([[5, 5, 5]]) == 2


def test_jobs_that_join_a_running_batch_and_leave_it_at_different_steps_keep_their_output(engine, caplog):
    """Jobs arrive while others decode, finish at different steps, a long prompt joins late (the
    arena moves every row right), and long-prompt rows leave before the short ones (the arena drops
    the padding columns they leave behind)."""
    first = [prepare(engine, f"a{i}", prompt=PROMPTS[i], num_beams=1, max_new_tokens=20 + 10 * i, min_new_tokens=20) for i in range(4)]
    later = [prepare(engine, f"b{i}", **{"prompt": PROMPTS[4 + i] * 2, "num_beams": 1, "max_new_tokens": 30, "min_new_tokens": 30, **VARIANTS[i]})
             for i in range(6)]
    long_prompt = prepare(engine, "long", prompt="The quick brown fox jumps over the lazy dog. " * 12, num_beams=1, max_new_tokens=8, min_new_tokens=8)
    jobs = first + later + [long_prompt]
    reference = {job.job_id: alone(engine, job) for job in jobs}
    caplog.set_level(logging.INFO, logger="belle.batcher")
    batcher = batcher_for(engine, batch_wait_ms=5, batch_max_delay_ms=20)
    try:
        early = [batcher.submit(job) for job in first]
        wait_for(lambda: batcher.decoding, 60, "the first jobs decode", poll=0.001)
        mid = [batcher.submit(job) for job in later]
        wait_for(lambda: not batcher.waiting_ids(), 60, "the later jobs joined")
        last = batcher.submit(long_prompt)
        results = {g.job_id: g.result for g in (f.result(timeout=120) for f in early + mid + [last])}
        widest = max(lane.arena.column_capacity for lane in batcher._batch.lanes)
    finally:
        batcher.stop()
    joins = [line for line in caplog.messages if "jobs joined" in line]
    assert len(joins) >= 3, joins
    assert any("now 1 jobs" not in line and "joined" in line for line in joins[1:]), "later jobs joined a running batch"
    for job in jobs:
        assert_same_output(results[job.job_id].sequences, reference[job.job_id], job.job_id)
    assert max(r.timings.batch_size for r in results.values()) > len(first)
    assert widest > TRIM_AT


def test_arena_drops_padding_shared_by_every_row(tiny_bloom):
    engine = load(tiny_bloom)
    long = prepare(engine, "long", prompt="天气很好 " * 30, num_beams=1, max_new_tokens=2, min_new_tokens=2)
    short = prepare(engine, "short", prompt="Hi", num_beams=1, max_new_tokens=10, min_new_tokens=10)
    batch = DecodeBatch(engine)
    from worker.model.decoding import ActiveJob

    rows = [r for job in (long, short) for r in ActiveJob.start(job, engine, streaming=False).rows]
    batch.join([[rows[0]], [rows[1]]])
    width = batch.length
    assert width == len(long.input_ids) > TRIM_AT
    batch.choose()
    batch.forward()
    finished = batch.choose().finished
    assert finished == [rows[0]]
    batch.remove(finished)
    assert batch.length == len(short.input_ids) + 1, "only the short row's columns are left"
    batch.forward()
    assert batch.choose().finished == [] and batch.length == len(short.input_ids) + 2


def test_a_burst_becomes_one_batch_and_a_lone_job_is_not_held_back(tiny_bloom):
    engine = load(tiny_bloom)
    # A full batch starts once it is there, however long the wait for company would be.
    batcher = Batcher(engine, Settings(batch_max_size=8, batch_wait_ms=60_000, batch_max_delay_ms=120_000)).start()
    try:
        burst = [batcher.submit(prepare(engine, f"b{i}", prompt=f"question number {i}", num_beams=1, max_new_tokens=4, min_new_tokens=4)) for i in range(8)]
        assert {f.result(timeout=60).result.timings.batch_size for f in burst} == {8}
    finally:
        batcher.stop()
    batcher = Batcher(engine, Settings(batch_wait_ms=20, batch_max_delay_ms=3000)).start()
    try:
        started = time.monotonic()
        lone = batcher.run(prepare(engine, "lone", prompt="Hi", num_beams=1, max_new_tokens=4))
        # Released once 20 ms pass without another arrival, not after the 3 s cap.
        assert lone.result.timings.batch_size == 1 and time.monotonic() - started < 1.5
    finally:
        batcher.stop()


def test_an_over_budget_burst_waits_and_joins_in_parts_and_all_jobs_succeed(tiny_bloom, caplog):
    engine = load(tiny_bloom)
    jobs = [prepare(engine, f"j{i}", prompt=f"question number {i}: {PROMPTS[i % 3]}", num_beams=1, max_new_tokens=8) for i in range(32)]
    reference = {job.job_id: alone(engine, job) for job in jobs}
    engine.fault_memory_budget_tokens = batch_cost(jobs) // 5  # the 32 cannot decode together; 6 can
    batcher = batcher_for(engine)
    caplog.set_level(logging.INFO, logger="belle.batcher")
    try:
        results = run_all(batcher, jobs)
    finally:
        batcher.stop()
    assert sorted(results) == sorted(j.job_id for j in jobs)  # every job, once
    for job in jobs:
        assert_same_output(results[job.job_id].sequences, reference[job.job_id], job.job_id)
        assert results[job.job_id].timings.batch_size < 32
    assert "out of memory when 32 jobs joined a batch of 0" in caplog.text
    assert batcher.budget.limit < batch_cost(jobs) and f"budget={batcher.budget.limit}" in caplog.text
    # With the remembered budget, jobs join a few at a time from the start: the first join fits. (The
    # budget then grows back after TokenBudget.GROW_AFTER successes, and may find the limit again.)
    again = [prepare(engine, f"k{i}", prompt=f"question number {i}: {PROMPTS[i % 3]}", num_beams=1, max_new_tokens=8) for i in range(32)]
    caplog.clear()
    batcher = Batcher(engine, Settings(batch_wait_ms=50, batch_max_delay_ms=500))
    batcher.budget.limit = engine.fault_memory_budget_tokens
    batcher.start()
    try:
        assert len(run_all(batcher, again)) == 32
    finally:
        batcher.stop()
    events = [m for m in caplog.messages if "jobs joined" in m or "out of memory" in m]
    assert "jobs joined" in events[0] and "now 32 jobs" not in events[0]


def test_a_step_that_runs_out_of_memory_sets_jobs_aside_and_they_finish_with_the_same_output(engine, caplog):
    """Beam search jobs among them: a beam job's rows are set aside together, with its search."""
    jobs = [prepare(engine, f"j{i}", **{"prompt": PROMPTS[i % len(PROMPTS)], "num_beams": 3 if i % 3 == 1 else 1, "max_new_tokens": 30,
                                        "min_new_tokens": 30, **VARIANTS[i % 3]})
            for i in range(8)]
    reference = {job.job_id: alone(engine, job) for job in jobs}
    caplog.set_level(logging.INFO, logger="belle.batcher")
    batcher = batcher_for(engine)
    try:
        futures = [batcher.submit(job) for job in jobs]
        wait_for(lambda: "jobs joined" in caplog.text, 60, "the jobs joined")
        full = batcher._batch.cost()
        engine.fault_memory_budget_tokens = full // 3  # the running batch no longer fits
        results = {g.job_id: g.result for g in (f.result(timeout=120) for f in futures)}
    finally:
        engine.fault_memory_budget_tokens = None
        batcher.stop()
    assert "out of memory in a decoding step of 8 jobs" in caplog.text and "set aside with their tokens" in caplog.text
    for job in jobs:
        assert_same_output(results[job.job_id].sequences, reference[job.job_id], job.job_id)


def test_a_job_that_is_too_big_alone_fails_with_out_of_memory_and_only_it(tiny_bloom, caplog):
    engine = load(tiny_bloom)
    small = [prepare(engine, f"s{i}", prompt=f"question number {i}", num_beams=1, max_new_tokens=40) for i in range(3)]
    big = prepare(engine, "big", prompt="天气很好 " * 12, num_beams=1, max_new_tokens=40)
    reference = {job.job_id: alone(engine, job) for job in small}
    engine.fault_memory_budget_tokens = batch_cost([big]) - 1
    assert batch_cost([small[0]]) <= engine.fault_memory_budget_tokens
    caplog.set_level(logging.INFO, logger="belle.batcher")
    batcher = batcher_for(engine)
    try:
        futures = {job.job_id: batcher.submit(job) for job in [big, *small]}
        with pytest.raises(JobFailure) as info:
            futures["big"].result(timeout=120)
        assert info.value.error.code is ErrorCode.OUT_OF_MEMORY and info.value.error.parameter == "max_new_tokens"
        assert "reduce max_new_tokens" in info.value.error.message
        for job in small:
            assert_same_output(futures[job.job_id].result(timeout=120).result.sequences, reference[job.job_id], job.job_id)
    finally:
        batcher.stop()
    assert "out of memory when 4 jobs joined" in caplog.text and "job big ran out of memory alone" in caplog.text


def test_a_beam_sampling_batch_over_budget_is_split_and_a_job_too_big_alone_fails(tiny_bloom, caplog):
    """Beam sampling runs as generate() calls of jobs that share their parameters."""
    engine = load(tiny_bloom)
    jobs = [prepare(engine, f"k{i}", prompt=f"question number {i}", do_sample=True, num_beams=2, max_new_tokens=8, min_new_tokens=8) for i in range(8)]
    big = prepare(engine, "kbig", prompt="天气很好 " * 40, do_sample=True, num_beams=2, max_new_tokens=8)
    engine.fault_memory_budget_tokens = batch_cost(jobs[:3])
    assert batch_cost([big]) > engine.fault_memory_budget_tokens
    caplog.set_level(logging.INFO, logger="belle.batcher")
    batcher = batcher_for(engine)
    try:
        futures = {job.job_id: batcher.submit(job) for job in [*jobs, big]}
        with pytest.raises(JobFailure) as info:
            futures["kbig"].result(timeout=120)
        assert info.value.error.code is ErrorCode.OUT_OF_MEMORY
        for job in jobs:
            (sequence,) = futures[job.job_id].result(timeout=120).result.sequences
            assert len(sequence.token_ids) == 8 and sequence.score is not None, job.job_id
    finally:
        batcher.stop()
    assert "out of memory on a batch of 8" in caplog.text and "job kbig ran out of memory alone" in caplog.text


def test_a_job_that_makes_the_model_raise_fails_alone_with_generation_error(tiny_bloom):
    engine = load(tiny_bloom)
    good = [prepare(engine, f"g{i}", prompt=f"question number {i}", num_beams=1, max_new_tokens=6) for i in range(5)]
    # Token ids past the vocabulary: the real embedding raises IndexError for the whole prefill.
    bad = dataclasses.replace(good[0], job_id="bad", input_ids=[len(engine.tokenizer) + 10] * len(good[0].input_ids))
    batcher = batcher_for(engine)
    try:
        futures = {job.job_id: batcher.submit(job) for job in [good[0], good[1], bad, *good[2:]]}
        with pytest.raises(JobFailure) as info:
            futures["bad"].result(timeout=120)
        assert info.value.error.code is ErrorCode.GENERATION_ERROR and "IndexError" in info.value.error.message
        assert all(futures[job.job_id].result(timeout=120).result.sequences for job in good)
    finally:
        batcher.stop()


def test_seeded_sampling_gives_the_same_text_whatever_decodes_beside_it(engine):
    job = prepare(engine, "seeded", prompt=PROMPTS[3], do_sample=True, num_beams=1, temperature=1.0, top_p=0.95, top_k=0, seed=11, num_return_sequences=3, max_new_tokens=20)
    neighbours = [prepare(engine, f"n{i}", prompt=PROMPTS[i], do_sample=True, temperature=1.2, num_beams=1, max_new_tokens=12) for i in range(5)]
    batcher = batcher_for(engine)
    try:
        (solo,) = run_all(batcher, [job]).values()
        other_seed = run_all(batcher, [dataclasses.replace(job, request=job.request.model_copy(update={"seed": 12}))])["seeded"]
    finally:
        batcher.stop()
    together = batcher_for(engine, batch_max_size=6, batch_wait_ms=60_000, batch_max_delay_ms=120_000)  # the six start together once all are there
    try:
        crowded = run_all(together, [*neighbours, job])["seeded"]
    finally:
        together.stop()
    assert crowded.timings.batch_size == 6 and solo.timings.batch_size == 1
    assert crowded.sequences == solo.sequences
    assert len({tuple(s.token_ids) for s in solo.sequences}) == 3, "the three sequences were drawn apart"
    assert other_seed.sequences != solo.sequences


def test_the_token_budget_halves_on_oom_and_grows_back_slowly():
    budget = TokenBudget(1000)
    budget.failed(800)
    assert budget.limit == 400
    for _ in range(TokenBudget.GROW_AFTER - 1):
        budget.succeeded(300)
    assert budget.limit == 400
    budget.succeeded(300)
    assert 400 < budget.limit <= 1000
    for _ in range(50 * TokenBudget.GROW_AFTER):
        budget.succeeded(300)
    assert budget.limit == 1000


def test_prefill_groups_keep_padding_low_and_calls_bounded():
    from types import SimpleNamespace

    from worker.model.decoding import prefill_groups

    rows = [SimpleNamespace(inputs=[0] * n) for n in (3, 4, 4, 5, 10, 11, 12, 40, 200)]
    groups = prefill_groups(rows, max_rows=3, max_tokens=64)
    assert [[len(r.inputs) for r in g] for g in groups] == [[3, 4, 4], [5], [10, 11, 12], [40], [200]]
    for group in groups:
        real = sum(len(r.inputs) for r in group)
        assert real >= 0.8 * len(group) * max(len(r.inputs) for r in group)
        assert len(group) == 1 or len(group) * max(len(r.inputs) for r in group) <= 64


# --- failures at every boundary (faults injected where real ones would strike) ---


def decoding(engine, jobs):
    from worker.model.decoding import ActiveJob

    return [ActiveJob.start(job, engine, streaming=False) for job in jobs]


def drive(batch, actives) -> dict:
    """Step a DecodeBatch until its rows are done; the generated tokens of each job's first row."""
    while len(batch):
        batch.remove(batch.choose().finished)
        if len(batch):
            batch.forward()
    return {a.job_id: a.rows[0].tokens for a in actives}


def test_a_join_that_runs_out_of_memory_while_moving_the_arena_leaves_the_running_rows_intact(tiny_bloom, monkeypatch):
    import torch

    import worker.model.kv_cache as kv_cache

    engine = load(tiny_bloom)
    short = prepare(engine, "short", prompt="Hi", num_beams=1, max_new_tokens=30, min_new_tokens=30)
    long = prepare(engine, "long", prompt="天气很好 " * 40, num_beams=1, max_new_tokens=30, min_new_tokens=30)
    reference = alone(engine, short)[0].token_ids
    batch = DecodeBatch(engine)
    (a,) = decoding(engine, [short])
    batch.join([a.rows])
    batch.remove(batch.choose().finished)
    batch.forward()
    moved = kv_cache._moved
    calls = {"n": 0}

    def fails_on_the_values(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > engine.num_layers:  # the keys are built; the values run out of memory
            raise torch.OutOfMemoryError("injected")
        return moved(*args, **kwargs)

    monkeypatch.setattr(kv_cache, "_moved", fails_on_the_values)
    (b,) = decoding(engine, [long])
    with pytest.raises(torch.OutOfMemoryError):
        batch.join([b.rows])
    monkeypatch.setattr(kv_cache, "_moved", moved)
    assert len(batch) == 1
    assert drive(batch, [a])["short"] == reference, "the running job decodes on as if nothing happened"


def test_a_first_join_that_fails_leaves_no_columns_behind(tiny_bloom, monkeypatch):
    import torch

    engine = load(tiny_bloom)
    batch = DecodeBatch(engine)
    (big,) = decoding(engine, [prepare(engine, "big", prompt="天气很好 " * 40, num_beams=1, max_new_tokens=4)])
    forward = engine.forward
    monkeypatch.setattr(engine, "forward", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("injected")))
    with pytest.raises(torch.OutOfMemoryError):
        batch.join([big.rows])
    monkeypatch.setattr(engine, "forward", forward)
    assert (len(batch), batch.length) == (0, 0)
    small = prepare(engine, "small", prompt="Hi", num_beams=1, max_new_tokens=4)
    (s,) = decoding(engine, [small])
    batch.join([s.rows])
    assert batch.length == len(small.input_ids)
    assert drive(batch, [s])["small"] == alone(engine, small)[0].token_ids


def test_choosing_tokens_that_runs_out_of_memory_sets_jobs_aside_and_draws_the_same(engine, monkeypatch, caplog):
    import torch

    import worker.model.decoding as decoding_module

    jobs = [prepare(engine, f"c{i}", prompt=PROMPTS[i], num_beams=1, max_new_tokens=20, min_new_tokens=20, **({"do_sample": True, "seed": i} if i % 2 else {}))
            for i in range(6)]
    reference = {job.job_id: run_all(batcher := batcher_for(engine), [job])[job.job_id].sequences for job in jobs}
    batcher.stop()
    processors = decoding_module.apply_processors
    state = {"armed": True}

    def runs_out_once(logits, *args, **kwargs):
        if state["armed"] and logits.shape[0] == len(jobs):
            state["armed"] = False
            raise torch.OutOfMemoryError("injected")
        return processors(logits, *args, **kwargs)

    monkeypatch.setattr(decoding_module, "apply_processors", runs_out_once)
    caplog.set_level(logging.INFO, logger="belle.batcher")
    batcher = batcher_for(engine)
    try:
        results = run_all(batcher, jobs)
    finally:
        batcher.stop()
    assert not state["armed"] and "out of memory in a decoding step of 6 jobs" in caplog.text
    for job in jobs:
        assert results[job.job_id].sequences == reference[job.job_id], job.job_id


def test_a_job_whose_scores_are_unusable_fails_alone(tiny_bloom, monkeypatch):
    engine = load(tiny_bloom)
    jobs = [prepare(engine, f"n{i}", prompt=PROMPTS[i], num_beams=1, max_new_tokens=10, min_new_tokens=10) for i in range(4)]
    poison = prepare(engine, "poison", prompt=PROMPTS[5], num_beams=1, max_new_tokens=10, min_new_tokens=10)
    reference = {job.job_id: alone(engine, job) for job in jobs}
    forward = DecodeBatch.forward

    def overflowing(self):  # as float16 overflow would leave one row's scores
        forward(self)
        for i, row in enumerate(self.rows):
            if row.active.job_id == "poison":
                self.logits[i] = float("nan")

    monkeypatch.setattr(DecodeBatch, "forward", overflowing)
    batcher = batcher_for(engine)
    try:
        futures = {job.job_id: batcher.submit(job) for job in [*jobs, poison]}
        with pytest.raises(JobFailure, match="no usable next-token scores"):
            futures["poison"].result(timeout=60)
        for job in jobs:
            assert futures[job.job_id].result(timeout=60).result.sequences == reference[job.job_id]
    finally:
        batcher.stop()


def test_a_batcher_bug_fails_only_the_jobs_it_was_running(tiny_bloom, monkeypatch):
    engine = load(tiny_bloom)
    greedy = prepare(engine, "greedy", prompt="Hello", num_beams=1, max_new_tokens=2000, min_new_tokens=100)
    beam = prepare(engine, "beam", prompt="Hello", do_sample=True, num_beams=2, max_new_tokens=4)
    later = prepare(engine, "later", prompt="Hi", num_beams=1, max_new_tokens=4)
    choose = DecodeBatch.choose
    state = {"beam done": False, "raised": False}
    generate = Batcher._generate

    def generate_then_flag(self, items):
        generate(self, items)
        state["beam done"] = True

    def breaks_once(self):
        if state["beam done"] and not state["raised"]:
            state["raised"] = True
            raise RuntimeError("injected bug")
        return choose(self)

    monkeypatch.setattr(Batcher, "_generate", generate_then_flag)
    monkeypatch.setattr(DecodeBatch, "choose", breaks_once)
    batcher = batcher_for(engine, batch_wait_ms=1, batch_max_delay_ms=5)
    try:
        running = batcher.submit(greedy)
        wait_for(lambda: batcher.decoding, 60, "the first job decodes", poll=0.001)
        beam_future = batcher.submit(beam)
        assert beam_future.result(timeout=60).result.sequences, "the beam job that finished keeps its result"
        with pytest.raises(JobFailure, match="the batcher failed: RuntimeError: injected bug"):
            running.result(timeout=60)
        assert batcher.run(later).result.sequences, "the batcher goes on"
    finally:
        batcher.stop()
    assert state["raised"]


def test_a_beam_sampling_job_that_runs_out_of_memory_beside_the_decoding_batch_runs_once_it_is_empty(tiny_bloom, caplog):
    engine = load(tiny_bloom)
    greedy = prepare(engine, "greedy", prompt="Hello there", num_beams=1, max_new_tokens=80, min_new_tokens=80)
    beam = prepare(engine, "beam", prompt="Hello", do_sample=True, seed=3, num_beams=2, max_new_tokens=8)
    reference = alone(engine, beam)
    engine.fault_memory_budget_tokens = batch_cost([beam]) + batch_cost([greedy]) - 1  # each fits alone, not both together
    caplog.set_level(logging.INFO, logger="belle.batcher")
    batcher = batcher_for(engine, batch_wait_ms=1, batch_max_delay_ms=5)
    try:
        running = batcher.submit(greedy)
        wait_for(lambda: batcher.decoding, 60, "the first job decodes", poll=0.001)
        result = batcher.run(beam).result
        assert running.result(timeout=60).result.sequences
    finally:
        batcher.stop()
    assert "job beam ran out of memory beside the decoding batch; it runs once that is empty" in caplog.text
    assert_same_output(result.sequences, reference, "beam")


def test_a_job_past_its_deadline_or_cancelled_while_it_waits_ends_without_running(tiny_bloom, caplog):
    from worker.scheduling.batcher import JobCancelled

    engine = load(tiny_bloom)
    late = engine.prepare("late", parse_request({"prompt": "hi", "num_beams": 1, "deadline": time.time() - 1}, resolved=True))

    class Cancelled:
        def is_cancelled(self, job_id):
            return job_id == "gone"

    caplog.set_level(logging.INFO, logger="belle.batcher")
    batcher = Batcher(engine, Settings(batch_wait_ms=20), cancellations=Cancelled()).start()
    try:
        with pytest.raises(JobFailure) as info:
            batcher.run(late)
        assert info.value.error.code is ErrorCode.EXPIRED and info.value.error.parameter == "deadline"
        with pytest.raises(JobCancelled):
            batcher.run(prepare(engine, "gone", prompt="hi", num_beams=1))
    finally:
        batcher.stop()
    assert "jobs joined" not in caplog.text, "neither was prefilled"


def test_beam_search_stop_strings_count_only_generated_text_and_leave_the_global_rng_alone(tiny_bloom):
    import torch

    engine = load(tiny_bloom)
    prompt = "Hello"
    plain = prepare(engine, "plain", prompt=prompt, num_beams=2, max_new_tokens=6)
    text = alone(engine, plain)[0].text
    stop = "\n" + text[:1]  # spans the end of the prompt ("Assistant: ") and the first generated character
    assert text and stop not in text
    with_stop = dataclasses.replace(plain, job_id="stop", request=plain.request.model_copy(update={"stop": [stop]}))
    assert [s.token_ids for s in alone(engine, with_stop)] == [s.token_ids for s in alone(engine, plain)]
    state = torch.get_rng_state()
    seeded = prepare(engine, "seeded", prompt=prompt, num_beams=2, do_sample=True, seed=3, max_new_tokens=4)
    engine.generate_batch([seeded])
    assert torch.equal(torch.get_rng_state(), state), "a seeded job does not reseed other jobs' draws"


def test_a_job_on_its_last_attempt_runs_alone_even_behind_a_trickle_of_interactive_jobs(tiny_bloom):
    from worker.scheduling.batcher import BULK

    engine = load(tiny_bloom)
    batcher = batcher_for(engine, batch_wait_ms=1, batch_max_delay_ms=5, max_attempts=3)
    trickle = []
    try:
        trickle.append(batcher.submit(prepare(engine, "first", prompt="Hello there", num_beams=1, max_new_tokens=24, min_new_tokens=24)))
        wait_for(lambda: batcher.decoding, 60, "the first job decodes", poll=0.001)
        last = dataclasses.replace(prepare(engine, "last", prompt="Hello", num_beams=1, max_new_tokens=4), attempt=3)
        future = batcher.submit(last, priority=BULK)
        deadline = time.monotonic() + 60
        while not future.done():  # interactive jobs keep arriving, each would join the decoding batch
            assert time.monotonic() < deadline, "the last-attempt job never ran"
            trickle.append(batcher.submit(prepare(engine, f"t{len(trickle)}", prompt="Hi", num_beams=1, max_new_tokens=24, min_new_tokens=24)))
            time.sleep(0.05)
        assert future.result().result.timings.batch_size == 1
        assert all(f.result(timeout=60).result.sequences for f in trickle)
    finally:
        batcher.stop()


def test_a_batcher_says_it_is_unhealthy_when_stuck_with_work_or_dead(tiny_bloom, monkeypatch):
    import threading

    engine = load(tiny_bloom)
    batcher = batcher_for(engine, batch_wait_ms=1, batch_max_delay_ms=5)
    stays(lambda: batcher.healthy(stall_s=0.2), 0.5, "an idle batcher is healthy however long it waits (longer than stall_s here)")
    release = threading.Event()
    step = batcher._step
    monkeypatch.setattr(batcher, "_step", lambda: (release.wait(30), step()))  # a device that hangs
    future = batcher.submit(prepare(engine, "hangs", prompt="Hello", num_beams=1, max_new_tokens=4))
    wait_for(lambda: not batcher.healthy(stall_s=0.2), 30, "a batcher stuck with work says so")
    assert batcher.healthy(stall_s=60)
    release.set()
    assert future.result(timeout=60).result.sequences
    batcher.stop()
    assert not batcher.healthy(), "a stopped batcher is not"
