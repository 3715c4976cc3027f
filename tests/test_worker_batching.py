"""Continuous batching and OOM handling through Redis and a real worker process."""

from __future__ import annotations

import pytest

from producer.client import JobClient
from producer.errors import ErrorCode
from producer.records import JobState
from producer.settings import Settings

# Prompt token counts of these requests are close, so the burst forms one batch.
BURST = [{"prompt": f"question number {i}: what is machine learning?", "num_beams": 1, "max_new_tokens": 8} for i in range(32)]


@pytest.fixture(scope="module")
def oom_worker(new_database, start_worker, bloom_config):
    """A worker on its own Redis database whose simulated memory fits about 10 of the burst's jobs."""
    url = new_database()
    worker = start_worker(bloom_config, name="oom@tests", redis_url=url, env={
        "BELLE_FAULT_MEMORY_BUDGET_TOKENS": "500", "BELLE_BATCH_WAIT_MS": "200", "BELLE_BATCH_MAX_DELAY_MS": "2000",
    })
    with JobClient(Settings(redis_url=url)) as client:
        yield worker, client
    assert worker.alive(), worker.log[-4000:]


def test_a_burst_through_the_queue_runs_batched_with_the_same_output(live_client):
    # 48 steps each: the first jobs still decode while the last are submitted, even on a busy machine (where
    # 8 new tokens could end each job before the next arrived), so the burst decodes together.
    burst = [{**r, "max_new_tokens": 48, "min_new_tokens": 48} for r in BURST]
    alone = [live_client.wait(live_client.submit(r), 60) for r in burst[:4]]
    ids = [live_client.submit(r) for r in burst]
    records = [live_client.wait(job_id, 120) for job_id in ids]
    assert all(r.state is JobState.SUCCEEDED for r in records)
    assert max(r.result.timings.batch_size for r in records) >= 8
    for solo, batched in zip(alone, records):
        assert solo.result.timings.batch_size == 1
        assert solo.result.sequences == batched.result.sequences


def test_an_over_budget_burst_is_split_and_every_job_succeeds(oom_worker):
    worker, client = oom_worker
    ids = [client.submit(r) for r in BURST]
    records = [client.wait(job_id, 120) for job_id in ids]
    assert [r.state for r in records] == [JobState.SUCCEEDED] * 32
    assert all(r.attempts == 1 for r in records)
    assert max(r.result.timings.batch_size for r in records) < 32
    assert "out of memory when" in worker.log and "token budget now" in worker.log


def test_a_job_too_big_alone_fails_with_out_of_memory_and_its_batch_mates_succeed(oom_worker):
    worker, client = oom_worker
    # Same parameters, so they share a batch: 4 beams × (25 prompt + 60 new) = 340 tokens fits the
    # 500-token budget alone, the long prompt's 4 × (88 + 60) = 592 does not.
    params = {"num_beams": 4, "max_new_tokens": 60, "min_new_tokens": 60}
    big = client.submit({"prompt": "天气很好 " * 20, **params})
    small = [client.submit({"prompt": f"question number {i}: what is machine learning?", **params}) for i in range(3)]
    failed = client.wait(big, 120)
    assert failed.state is JobState.FAILED and failed.error.code is ErrorCode.OUT_OF_MEMORY
    assert "reduce max_new_tokens" in failed.error.message and failed.result is None and failed.attempts == 1
    for job_id in small:
        record = client.wait(job_id, 120)
        assert record.state is JobState.SUCCEEDED and record.attempts == 1
    # With the budget this worker remembers from the burst above, the long prompt may already run in
    # a batch of its own (tests/test_batcher.py covers the shared batch with a fresh budget).
    assert "ran out of memory alone" in worker.log
