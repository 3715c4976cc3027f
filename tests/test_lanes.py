"""Lanes and the prefix cache of the decoding batch, on the real tiny models: a row's cost follows its
own length, and a prompt that starts like an earlier one prefills only the rest; every output stays
what ``generate()`` gives the job alone."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import worker.costs as costs
from tests.waiting import wait_for
from tests.test_batcher import BEAM_VARIANTS, PROMPTS, VARIANTS, alone, assert_same_output, batcher_for, load, prepare, run_all
from worker.costs import LaneShape, lane_for, lanes_cost, place
from worker.model.decoding import ActiveJob, DecodeBatch
from worker.model.engine import batch_cost
from worker.model.prefix_cache import BLOCK, MIN_TOKENS, PrefixCache

LONG = "The quick brown fox jumps over the lazy dog, and 北京的天气很好。 " * 12


@pytest.fixture(scope="module", params=["bloom", "llama"])
def engine(request):
    return load(request.getfixturevalue(f"tiny_{request.param}"))


@pytest.fixture
def narrow_lanes(monkeypatch):
    """Lanes at the tiny models' scale: a lane stays shared only while it is mostly real tokens."""
    monkeypatch.setattr(costs, "LANE_MIN_COLUMNS", 16)


def test_a_long_row_gets_a_lane_of_its_own_and_similar_rows_share_one():
    short = LaneShape(rows=62, columns=90, to_come=32, real=62 * 60)
    assert lane_for([short], 1, 80, 32, 80) == 0, "a row like the others joins their lane"
    assert lane_for([short], 1, 1370, 32, 1370) == 1, "a long prompt opens a lane of its own"
    at, lanes = place([short], 1, 1370, 32, 1370)
    at2, lanes = place(lanes, 1, 1000, 32, 1000)
    assert (at, at2) == (1, 1), "a second long prompt shares the long lane"
    assert lanes_cost(lanes) == 62 * (90 + 32) + 2 * (1370 + 32)
    assert lanes_cost(lanes) < 64 * (1370 + 32) / 6, "far below the rectangle of every row as long as the longest"
    assert lane_for([LaneShape(4, 20, 8, 60)], 1, 100, 8, 100) == 0, "a lane that stays narrow takes any row"
    full = [LaneShape(1, 100 * (i + 1), 8, 100 * (i + 1)) for i in range(costs.MAX_LANES)]
    assert lane_for(full, 1, 5000, 8, 5000) < costs.MAX_LANES, "no lane past MAX_LANES"


def test_rows_of_very_different_lengths_decode_in_lanes_and_keep_their_output(engine, narrow_lanes, caplog):
    """Short jobs and long prompts of every kind (greedy variants, beams, seeded sampling) decode in
    separate lanes, joining and leaving at different steps; each gives what it gives alone."""
    jobs = [prepare(engine, f"s{i}", **{"prompt": PROMPTS[i], "num_beams": 1, "max_new_tokens": 10 + 3 * i, **VARIANTS[i % len(VARIANTS)]})
            for i in range(8)]
    jobs += [prepare(engine, f"l{i}", **{"prompt": LONG[: 200 + 150 * i], "num_beams": 1, "max_new_tokens": 12, **VARIANTS[i]}) for i in range(2)]
    jobs.append(prepare(engine, "beam-long", **{"prompt": LONG[:300], "num_beams": 3, "max_new_tokens": 8, **BEAM_VARIANTS[1]}))
    jobs.append(prepare(engine, "beam-short", prompt="Hello", num_beams=2, max_new_tokens=8))
    reference = {job.job_id: alone(engine, job) for job in jobs}
    sampled = prepare(engine, "sample-long", prompt=LONG[:250], do_sample=True, seed=3, num_beams=1, num_return_sequences=2, max_new_tokens=8)
    caplog.set_level(logging.INFO, logger="belle.batcher")
    batcher = batcher_for(engine)
    try:
        first = run_all(batcher, [*jobs, sampled])
        again = run_all(batcher, [sampled])  # alone this time
    finally:
        batcher.stop()
    lanes = [line.split("in lanes of ")[1].split(" (")[0] for line in caplog.messages if "in lanes of" in line]
    assert any(len(x.split(", ")) >= 2 for x in lanes), lanes
    for job in jobs:
        assert_same_output(first[job.job_id].sequences, reference[job.job_id], job.job_id)
    assert [s.text for s in first["sample-long"].sequences] == [s.text for s in again["sample-long"].sequences]


def test_a_lane_holds_far_fewer_tokens_than_a_rectangle_would(engine, narrow_lanes):
    short = [prepare(engine, f"s{i}", prompt=PROMPTS[i % 3], num_beams=1, max_new_tokens=4) for i in range(12)]
    long = prepare(engine, "long", prompt=LONG, num_beams=1, max_new_tokens=4)
    batch = DecodeBatch(engine)
    actives = [ActiveJob.start(job, engine, streaming=False) for job in [*short, long]]
    batch.join([[r] for a in actives for r in a.rows])
    assert len([lane for lane in batch.lanes if len(lane)]) >= 2
    rectangle = len(batch) * batch.length
    held = sum(len(lane) * lane.length for lane in batch.lanes)
    real = sum(r.held for r in batch.rows)
    assert held <= 2 * real < rectangle / 2, (held, real, rectangle)


def test_a_prompt_that_starts_like_an_earlier_one_prefills_only_the_rest(engine):
    """A conversation's second turn reuses its first turn's keys and values (and so does a beam search
    job and a job of several sequences on the same opening); outputs stay those of generate() alone."""
    first = prepare(engine, "turn1", prompt=LONG, num_beams=1, max_new_tokens=8)
    assert len(first.input_ids) >= MIN_TOKENS + BLOCK
    later = [
        prepare(engine, "turn2", prompt=LONG + " And then what happened?", num_beams=1, max_new_tokens=10),
        prepare(engine, "beams", prompt=LONG + " 请总结。", num_beams=3, num_return_sequences=2, max_new_tokens=6),
        prepare(engine, "other", prompt="天气 " * 90, num_beams=1, max_new_tokens=6),
    ]
    reference = {job.job_id: alone(engine, job) for job in [first, *later]}
    batcher = batcher_for(engine, prefix_cache_tokens=4096)
    try:
        results = run_all(batcher, [first])
        prefixes = batcher._batch.prefixes
        assert len(prefixes) == 1 and prefixes.hits == 0
        results.update(run_all(batcher, later))
        assert prefixes.hits == 2, "turn2 and the beam job found the first turn; the other prompt did not"
        assert prefixes.reused_tokens >= 2 * MIN_TOKENS
    finally:
        batcher.stop()
    for job in [first, *later]:
        assert_same_output(results[job.job_id].sequences, reference[job.job_id], job.job_id)


def test_the_prefix_cache_keeps_adapters_apart_and_drops_the_least_recently_used():
    def kv(n):
        return [torch.full((2, n, 4), float(n))], [torch.full((2, n, 4), -float(n))]

    cache = PrefixCache(capacity_tokens=3 * BLOCK)
    a = list(range(2 * BLOCK + 5))
    b = [7] * (2 * BLOCK + 1)
    cache.store(None, a, kv)
    assert cache.find("lora", a) is None, "another adapter's keys are never reused"
    assert cache.find(None, a[: MIN_TOKENS]) is None, "a prompt must keep a token of its own"
    entry, n = cache.find(None, a + [1, 2, 3])
    assert n == 2 * BLOCK and entry.keys[0].shape == (2, 2 * BLOCK, 4)
    assert cache.find(None, [0] + a[1:]) is not None and cache.find(None, [9] + a[1:]) is None
    cache.store(None, b, kv)  # over capacity: the least recently used (a) goes
    assert cache.find(None, a) is None and cache.find(None, b + [0]) is not None
    assert cache.held == 2 * BLOCK
    cache.store(None, list(range(10)), kv)
    assert len(cache) == 1, "short prompts are not kept"


class Cancellations:
    def __init__(self):
        self.ids: set[str] = set()

    def is_cancelled(self, job_id: str) -> bool:
        return job_id in self.ids


def first_token_at(job, generated) -> float:
    timings = generated.result.timings
    return job.prepared_at + timings.admission_s + timings.first_token_s


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode_and_short_jobs_join_meanwhile(engine, caplog):
    """The jobs decoding go on between its chunks, a short job that arrives during its prefill gets its
    first token before it does, and every output (its own too, with beams and several sequences) is
    what generate() gives alone."""
    decoding = [prepare(engine, f"d{i}", **{"prompt": PROMPTS[i], "num_beams": 1, "max_new_tokens": 40, "min_new_tokens": 40, **VARIANTS[i]})
                for i in range(3)]
    long = prepare(engine, "long", prompt=LONG, num_beams=1, max_new_tokens=6)
    long_beams = prepare(engine, "long-beams", prompt=LONG + "?", num_beams=3, num_return_sequences=2, max_new_tokens=5)
    short = prepare(engine, "short", prompt="Hi", num_beams=1, max_new_tokens=3)
    assert len(long.input_ids) > 6 * 32 and len(short.input_ids) < 32
    reference = {job.job_id: alone(engine, job) for job in [*decoding, long, long_beams, short]}
    caplog.set_level(logging.INFO, logger="belle.batcher")
    batcher = batcher_for(engine, batch_prefill_chunk_tokens=32, batch_wait_ms=0)
    try:
        running = [batcher.submit(job) for job in decoding]
        wait_for(lambda: batcher.decoding, 60, "the first jobs decode", poll=0.001)
        long_futures = [batcher.submit(long), batcher.submit(long_beams)]
        wait_for(lambda: batcher._batch.filling, 60, "the long prompt is being prefilled", poll=0.0005)
        short_result = batcher.submit(short).result(timeout=120)
        long_results = [f.result(timeout=120) for f in long_futures]
        results = {g.job_id: g for g in [short_result, *long_results, *(f.result(timeout=120) for f in running)]}
    finally:
        batcher.stop()
    assert "prefilled 32 tokens at a time" in caplog.text
    for job_id, generated in results.items():
        assert_same_output(generated.result.sequences, reference[job_id], job_id)
    assert first_token_at(short, results["short"]) < first_token_at(long, results["long"]), "the short job did not wait for the long prefill"
    assert results["long"].result.timings.batch_size > 1, "the long job decoded beside the others"


def test_a_job_cancelled_or_out_of_memory_while_its_prompt_is_prefilled(tiny_llama, caplog):
    """Cancelled between two chunks: it ends with no text and the others go on. Out of memory in a chunk
    beside a decoding batch: it waits, starts again, and gives its output."""
    engine = load(tiny_llama)
    cancellations = Cancellations()
    others = [prepare(engine, f"o{i}", prompt=PROMPTS[i], num_beams=1, max_new_tokens=30, min_new_tokens=30) for i in (0, 1, 2, 5)]
    long = prepare(engine, "long", prompt=LONG, num_beams=1, max_new_tokens=6)
    reference = {job.job_id: alone(engine, job) for job in [*others, long]}
    assert all(len(job.input_ids) <= 16 for job in others)
    caplog.set_level(logging.INFO, logger="belle.batcher")
    from producer.settings import Settings
    from worker.scheduling.batcher import Batcher

    batcher = Batcher(engine, Settings(batch_prefill_chunk_tokens=16), cancellations=cancellations).start()
    try:
        running = [batcher.submit(job) for job in others]
        wait_for(lambda: batcher.decoding, 60, "the first jobs decode", poll=0.001)
        cancelled = batcher.submit(long)
        wait_for(lambda: batcher._batch.filling, 60, "the long prompt is being prefilled", poll=0.0005)
        cancellations.ids.add("long")
        ended = cancelled.result(timeout=120)
        assert ended.cancelled and ended.result.sequences[0].text == "" and "cancelled while its prompt was prefilled" in caplog.text
        assert not batcher._batch.filling
        for f in running:
            generated = f.result(timeout=120)
            assert_same_output(generated.result.sequences, reference[generated.job_id], generated.job_id)

        again = dataclasses.replace(long, job_id="long2")
        running = [batcher.submit(dataclasses.replace(job, job_id=f"{job.job_id}b")) for job in others]
        wait_for(lambda: {a.job_id for a in batcher._batch.jobs} == {f"{job.job_id}b" for job in others}, 60, "the others decode", poll=0.001)
        engine.fault_memory_budget_tokens = batch_cost([long]) + batch_cost(others) // 2  # each fits alone, not both together
        result = batcher.submit(again).result(timeout=120)
    finally:
        engine.fault_memory_budget_tokens = None
        batcher.stop()
    # (in its chunk, or in the step beside it, whichever ran first: either way it waits, not the jobs decoding)
    assert "out of memory while prefilling job long2's prompt" in caplog.text or "jobs whose prompts were being prefilled wait" in caplog.text
    assert_same_output(result.result.sequences, reference["long"], "long2")
    assert all(f.result(timeout=1).result.usage.completion_tokens == 30 for f in running)


def test_one_call_serves_every_lane_only_on_models_whose_attention_it_computes_as_they_do(tiny_bloom):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    from worker.model.lane_attention import supported

    small = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64}
    assert supported(AutoModelForCausalLM.from_config(LlamaConfig(**small), attn_implementation="sdpa"))
    assert not supported(AutoModelForCausalLM.from_config(LlamaConfig(**small), attn_implementation="eager"))
    assert not supported(AutoModelForCausalLM.from_config(MistralConfig(**small, sliding_window=16), attn_implementation="sdpa")), "a sliding window"
    assert not load(tiny_bloom).lane_attention, "BLOOM's ALiBi attention does not take the interface: one call per lane"


def test_a_jobs_rows_go_to_one_lane_even_when_its_prefill_is_split(engine, narrow_lanes):
    """A beam search job's rows move within their lane: rows split over prefill calls still share it."""
    batch = DecodeBatch(engine)
    short, wide = (ActiveJob.start(prepare(engine, job_id, prompt=prompt, num_beams=1, max_new_tokens=4), engine, streaming=False)
                   for job_id, prompt in (("short", "Hi"), ("wide", LONG)))
    batch.join([short.rows, wide.rows])
    beams = ActiveJob.start(prepare(engine, "beams", prompt=LONG[:400], num_beams=4, max_new_tokens=4), engine, streaming=False)
    split, _ = batch._placement([beams.rows[:3], beams.rows[3:]])
    assert len({at for _, at in split}) == 1, split
    batch.join([beams.rows[:3], beams.rows[3:]])
    lanes = {id(batch._slots[i][0]) for i, row in enumerate(batch.rows) if row.active is beams}
    assert len(lanes) == 1


def test_a_join_that_runs_out_of_memory_after_its_prefill_leaves_the_batch_as_it_was(engine, narrow_lanes, monkeypatch):
    """Out of memory while the joined rows' parameters are built (after the lanes took them): the rows
    leave the lanes again, and the running job decodes on as if nothing happened."""
    import worker.model.decoding as decoding

    running = prepare(engine, "running", prompt="Hi", num_beams=1, max_new_tokens=12, min_new_tokens=12)
    joining = prepare(engine, "joining", prompt=LONG, num_beams=3, max_new_tokens=4)
    reference = alone(engine, running)[0].token_ids
    batch = DecodeBatch(engine)
    (a,) = [ActiveJob.start(running, engine, streaming=False)]
    batch.join([a.rows])
    batch.remove(batch.choose().finished)
    batch.forward()
    of = decoding.RowParameters.of

    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("injected")
        return of(*args, **kwargs)

    monkeypatch.setattr(decoding.RowParameters, "of", fails_once)
    b = ActiveJob.start(joining, engine, streaming=False)
    with pytest.raises(torch.OutOfMemoryError):
        batch.join([b.rows])
    monkeypatch.setattr(decoding.RowParameters, "of", of)
    assert batch.rows == a.rows and [r for lane in batch.lanes for r in lane.rows] == a.rows and batch.seen.shape[0] == 1
    while len(batch):
        batch.remove(batch.choose().finished)
        if len(batch):
            batch.forward()
    assert a.rows[0].tokens == reference
