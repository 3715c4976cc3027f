"""Dynamic batching and OOM-aware retry, in-process on the real tiny models."""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest

from producer.errors import ErrorCode
from producer.schemas import parse_request
from producer.settings import Settings
from worker.batcher import Batcher, TokenBudget
from worker.engine import Engine, batch_cost
from worker.errors import JobFailure
from worker.model_config import ModelConfig

PROMPTS = [
    "Hi", "你好", "What is machine learning?", "请解释什么是人工智能，并举几个例子说明它在日常生活中的应用。",
    "The quick brown fox jumps over the lazy dog. " * 3, "北京", "写一篇关于环保的短文，不少于三百字，要求结构清晰，语言生动，有具体的建议。",
    "def generate_answer(prompt, max_new_tokens=200):", "🚀🌍😀", "Numbers and dates: 2024-05-01, 3.14159, 100%",
    "温度控制输出的随机性", "Beam search keeps several candidate sequences; sampling draws the next token.",
]


def load(path, **overrides) -> Engine:
    return Engine.load(ModelConfig(name="tiny", path=str(path), context_length=512), "cpu", **overrides)


@pytest.fixture(scope="module", params=["bloom", "llama"])
def engine(request) -> Engine:
    return load(request.getfixturevalue(f"tiny_{request.param}"))


def batcher_for(engine: Engine, **settings) -> Batcher:
    return Batcher(engine, Settings(**{"batch_wait_ms": 50, "batch_max_delay_ms": 500, **settings})).start()


def prepare(engine: Engine, job_id: str, **data):
    return engine.prepare(job_id, parse_request(data))


def test_greedy_output_is_the_same_alone_and_in_a_mixed_batch_of_32(engine):
    greedy = [prepare(engine, f"g{i}", prompt=PROMPTS[i % len(PROMPTS)] * (1 + i % 3), num_beams=1, max_new_tokens=16) for i in range(32)]
    others = [
        prepare(engine, "beam", prompt="Hello", num_beams=3, num_return_sequences=2, max_new_tokens=8),
        prepare(engine, "sample", prompt="Hello", do_sample=True, num_beams=1, seed=5, max_new_tokens=8),
        prepare(engine, "short", prompt="Hello", num_beams=1, max_new_tokens=4),
    ]
    alone = {job.job_id: engine.generate_batch([job])[0].result for job in greedy}
    batcher = batcher_for(engine)
    try:
        futures = [batcher.submit(job) for job in greedy + others]
        results = {f.result(timeout=120).job_id: f.result().result for f in futures}
    finally:
        batcher.stop()
    assert max(results[j.job_id].timings.batch_size for j in greedy) > 8, "the greedy jobs ran batched"
    for job in greedy:
        assert results[job.job_id].sequences == alone[job.job_id].sequences, job.job_id
    assert results["beam"].timings.batch_size == 1 and len(results["beam"].sequences) == 2
    assert results["short"].timings.batch_size == 1


def test_a_burst_becomes_one_batch_and_a_lone_job_is_not_held_back(tiny_bloom):
    engine = load(tiny_bloom)
    batcher = Batcher(engine, Settings(batch_wait_ms=20, batch_max_delay_ms=3000)).start()
    try:
        burst = [batcher.submit(prepare(engine, f"b{i}", prompt=f"question number {i}", num_beams=1, max_new_tokens=4)) for i in range(8)]
        assert {f.result(timeout=60).result.timings.batch_size for f in burst} == {8}
        started = time.monotonic()
        lone = batcher.run(prepare(engine, "lone", prompt="Hi", num_beams=1, max_new_tokens=4))
        # Released once 20 ms pass without another arrival, not after the 3 s cap.
        assert lone.result.timings.batch_size == 1 and time.monotonic() - started < 1.5
    finally:
        batcher.stop()


def test_batches_respect_size_token_budget_and_padding(tiny_bloom):
    engine = load(tiny_bloom)
    short = [prepare(engine, f"s{i}", prompt="Hi", num_beams=1, max_new_tokens=4) for i in range(6)]
    long = prepare(engine, "long", prompt="天气很好 " * 60, num_beams=1, max_new_tokens=4)
    one_cost = batch_cost([short[0]])
    batcher = Batcher(engine, Settings(batch_max_size=4, batch_max_tokens=one_cost * 3, batch_wait_ms=50, batch_max_delay_ms=500))
    for job in short + [long]:
        batcher.submit(job)
    with batcher._cond:
        first = batcher._next_batch()
        second = batcher._next_batch()
        third = batcher._next_batch()
    assert [p.job.job_id for p in first] == ["s0", "s1", "s2"]  # 3 fit the token budget (size allows 4)
    assert [p.job.job_id for p in second] == ["s3", "s4", "s5"]  # the long prompt would be mostly padding
    assert [p.job.job_id for p in third] == ["long"]


def test_an_over_budget_batch_is_split_until_it_fits_and_all_jobs_succeed(tiny_bloom, caplog):
    engine = load(tiny_bloom)
    jobs = [prepare(engine, f"j{i}", prompt=f"question number {i}: {PROMPTS[i % 3]}", num_beams=1, max_new_tokens=8) for i in range(32)]
    alone = {job.job_id: engine.generate_batch([job])[0].result.sequences for job in jobs}
    engine.fault_memory_budget_tokens = batch_cost(jobs) // 5  # the batch of 32 cannot run; batches of ≤ 6 can
    batcher = batcher_for(engine)
    caplog.set_level(logging.INFO, logger="belle.batcher")
    try:
        futures = [batcher.submit(job) for job in jobs]
        results = [f.result(timeout=120) for f in futures]
    finally:
        batcher.stop()
    assert sorted(g.job_id for g in results) == sorted(j.job_id for j in jobs)  # every job, once
    for g in results:
        assert g.result.sequences == alone[g.job_id]
        assert g.result.timings.batch_size < 32
    assert "out of memory on a batch of 32" in caplog.text
    assert batcher.budget.limit < batch_cost(jobs) and f"budget={batcher.budget.limit}" in caplog.text
    # The remembered budget forms smaller batches from the start: no second OOM.
    again = [prepare(engine, f"k{i}", prompt=f"question number {i}: {PROMPTS[i % 3]}", num_beams=1, max_new_tokens=8) for i in range(32)]
    caplog.clear()
    batcher = Batcher(engine, Settings(batch_wait_ms=50, batch_max_delay_ms=500))
    batcher.budget = TokenBudget(65_536)
    batcher.budget.limit = engine.fault_memory_budget_tokens
    batcher.start()
    try:
        assert all(f.result(timeout=120) for f in [batcher.submit(job) for job in again])
    finally:
        batcher.stop()
    assert "out of memory" not in caplog.text


def test_a_job_that_is_too_big_alone_fails_with_out_of_memory_and_only_it(tiny_bloom, caplog):
    engine = load(tiny_bloom)
    # One parameter group, so all four share a batch; only the long prompt is over budget alone.
    small = [prepare(engine, f"s{i}", prompt=f"question number {i}", num_beams=1, max_new_tokens=40) for i in range(3)]
    big = prepare(engine, "big", prompt="天气很好 " * 12, num_beams=1, max_new_tokens=40)
    alone = {job.job_id: engine.generate_batch([job])[0].result.sequences for job in small}
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
            assert futures[job.job_id].result(timeout=120).result.sequences == alone[job.job_id]
    finally:
        batcher.stop()
    assert "out of memory on a batch of 4" in caplog.text and "ran out of memory alone" in caplog.text


def test_a_job_that_makes_the_model_raise_fails_alone_with_generation_error(tiny_bloom):
    engine = load(tiny_bloom)
    good = [prepare(engine, f"g{i}", prompt=f"question number {i}", num_beams=1, max_new_tokens=6) for i in range(5)]
    # Token ids past the vocabulary: the real embedding raises IndexError for the whole batch.
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
