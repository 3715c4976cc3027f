"""Jobs through a real redis-server and a real Celery worker process serving the tiny BLOOM."""

from __future__ import annotations

import asyncio
import time

from producer import keys
from producer.aio import AsyncJobClient
from producer.enqueue import new_job_id
from producer.errors import ErrorCode
from producer.queueing import make_sender
from producer.records import FinishReason, JobState
from producer.settings import Settings
from tests.conftest import CONTEXT_LENGTH

PROMPTS = [
    "What is machine learning?", "请解释什么是人工智能", "写一篇关于环保的短文", "Hello", "北京是中国的首都",
    "The quick brown fox", "温度控制输出的随机性", "def f(x):", "Numbers: 1 2 3", "你好", "太空 探索 data model",
    "beam search 温度 随机", "上海 the lazy dog", "重复 token hello world",
]


def run_all(client, requests: list[dict], timeout: float = 120):
    ids = [client.submit(r) for r in requests]
    return [client.wait(job_id, timeout) for job_id in ids]


def wait_for_record(client, job_id: str, timeout: float = 60):
    """For a message put on the queue by hand: its record appears only when a worker takes it."""
    deadline = time.monotonic() + timeout
    while client.store.get(job_id) is None:
        assert time.monotonic() < deadline, f"no worker took job {job_id}"
        time.sleep(0.05)
    return client.wait(job_id, max(1.0, deadline - time.monotonic()))


def has_repeated_ngram(ids: list[int], n: int) -> bool:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


def test_greedy_job_succeeds_with_a_full_record(live_client, worker):
    (record,) = run_all(live_client, [{"prompt": "请解释什么是人工智能", "num_beams": 1, "max_new_tokens": 16}])
    assert record.state is JobState.SUCCEEDED and record.error is None
    assert record.attempts == 1 and record.worker == worker.name
    assert record.created_at <= record.started_at <= record.finished_at
    result = record.result
    (seq,) = result.sequences
    assert seq.finish_reason in (FinishReason.EOS, FinishReason.LENGTH) and 0 < len(seq.token_ids) <= 16
    assert seq.score is None and seq.logprobs is None
    assert result.usage.prompt_tokens > 0 and result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.model == "tiny-bloom" and result.timings.batch_size == 1 and result.timings.generation_s > 0
    assert record.request["prompt"] == "请解释什么是人工智能" and record.request["num_beams"] == 1


def test_greedy_is_deterministic_and_the_text_never_contains_the_prompt(live_client):
    requests = [{"prompt": p, "num_beams": 1, "max_new_tokens": 24} for p in PROMPTS]
    first, second = run_all(live_client, requests), run_all(live_client, requests)
    for prompt, a, b in zip(PROMPTS, first, second):
        assert a.result.sequences[0].token_ids == b.result.sequences[0].token_ids
        assert prompt not in a.text and "Assistant:" not in a.text


def test_beam_search_returns_two_scored_sequences(live_client):
    (record,) = run_all(live_client, [{"prompt": "写一篇关于环保的短文", "num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 12}])
    sequences = record.result.sequences
    assert [s.index for s in sequences] == [0, 1]
    assert all(s.score is not None and s.score < 0 for s in sequences)
    assert sequences[0].score >= sequences[1].score  # best beam first
    assert sequences[0].token_ids != sequences[1].token_ids
    assert record.result.usage.completion_tokens >= len(sequences[0].token_ids) + len(sequences[1].token_ids)


def test_sampling_with_a_seed_is_reproducible(live_client):
    base = {"prompt": "生成一篇关于太空探索的科幻短文", "do_sample": True, "num_beams": 1, "temperature": 1.5, "top_p": 1.0, "top_k": 0,
            "max_new_tokens": 16, "min_new_tokens": 16}
    a, b, c = run_all(live_client, [{**base, "seed": 11}, {**base, "seed": 11}, {**base, "seed": 12}])
    assert a.result.sequences[0].token_ids == b.result.sequences[0].token_ids
    assert a.result.sequences[0].token_ids != c.result.sequences[0].token_ids


def test_sampling_returns_several_sequences(live_client):
    (record,) = run_all(live_client, [{"prompt": "Hello", "preset": "sampling", "num_return_sequences": 3, "max_new_tokens": 8, "seed": 1}])
    assert len(record.result.sequences) == 3


def test_no_repeat_ngram_size_forbids_repeated_trigrams(live_client):
    free = run_all(live_client, [{"prompt": p, "num_beams": 1, "repetition_penalty": 1.0, "max_new_tokens": 48, "min_new_tokens": 48} for p in PROMPTS])
    # Control: without the constraint the tiny model does repeat itself, so the check below can fail.
    assert any(has_repeated_ngram(r.result.sequences[0].token_ids, 3) for r in free)
    constrained = run_all(live_client, [{"prompt": p, "num_beams": 1, "repetition_penalty": 1.5, "no_repeat_ngram_size": 3,
                                         "max_new_tokens": 48, "min_new_tokens": 48} for p in PROMPTS])
    for record in constrained:
        ids = record.result.sequences[0].token_ids
        assert len(ids) == 48 and not has_repeated_ngram(ids, 3)


def test_min_new_tokens_holds_back_eos(live_client):
    free = run_all(live_client, [{"prompt": p, "num_beams": 1, "max_new_tokens": 40} for p in PROMPTS])
    early = [p for p, r in zip(PROMPTS, free) if r.result.sequences[0].finish_reason is FinishReason.EOS and len(r.result.sequences[0].token_ids) < 20]
    assert early, "control: some prompts end (eos) before 20 tokens without min_new_tokens"
    forced = run_all(live_client, [{"prompt": p, "num_beams": 1, "max_new_tokens": 40, "min_new_tokens": 20} for p in early])
    for record in forced:
        assert len(record.result.sequences[0].token_ids) >= 20


def test_output_scores_gives_one_logprob_per_token(live_client):
    greedy, beams = run_all(live_client, [
        {"prompt": "Hello", "num_beams": 1, "max_new_tokens": 10, "output_scores": True},
        {"prompt": "Hello", "num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 10, "output_scores": True},
    ])
    for record in (greedy, beams):
        for seq in record.result.sequences:
            assert len(seq.logprobs) == len(seq.token_ids) == len(seq.tokens) > 0
            assert all(v <= 0 for v in seq.logprobs)


def test_stop_strings_cut_the_text(live_client):
    (free,) = run_all(live_client, [{"prompt": "The quick brown fox", "num_beams": 1, "max_new_tokens": 30, "min_new_tokens": 30}])
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), "control: pick a visible stop string from the middle of the free text"
    (stopped,) = run_all(live_client, [{"prompt": "The quick brown fox", "num_beams": 1, "max_new_tokens": 30, "min_new_tokens": 30, "stop": [stop]}])
    seq = stopped.result.sequences[0]
    assert seq.finish_reason is FinishReason.STOP
    assert stop not in seq.text and text.startswith(seq.text)


def test_a_long_history_is_truncated_to_fit(live_client):
    messages = []
    for i in range(40):
        messages += [{"role": "user", "content": f"第{i}个问题：今天天气怎么样？"}, {"role": "assistant", "content": f"第{i}个回答：天气很好。"}]
    messages.append({"role": "user", "content": "最后一个问题"})
    (record,) = run_all(live_client, [{"messages": messages, "num_beams": 1, "max_new_tokens": 32}])
    fit = record.result.prompt_fit
    assert record.state is JobState.SUCCEEDED
    assert fit.context_length == CONTEXT_LENGTH and fit.messages_dropped > 0 and fit.messages_dropped % 2 == 0
    assert record.result.usage.prompt_tokens + 32 <= CONTEXT_LENGTH


def test_a_prompt_too_long_for_the_context_fails_with_its_code(live_client):
    (record,) = run_all(live_client, [{"prompt": "天气很好 " * 400, "num_beams": 1, "max_new_tokens": 8}])
    assert record.state is JobState.FAILED and record.result is None
    assert record.error.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED and record.error.parameter == "prompt"
    assert f"context window is {CONTEXT_LENGTH} tokens" in record.error.message


def test_an_unknown_adapter_fails_cleanly(live_client):
    (record,) = run_all(live_client, [{"prompt": "hi", "adapter": "belle-lora"}])
    assert record.error.code is ErrorCode.INVALID_REQUEST and record.error.parameter == "adapter"


def test_malformed_messages_on_the_queue_fail_their_jobs_and_the_worker_keeps_serving(live_client, redis_server, worker):
    sender = make_sender(Settings(redis_url=redis_server.url))
    wrong_type, positional, not_an_object = new_job_id(), new_job_id(), new_job_id()
    try:
        sender.send_task(keys.TASK_GENERATE, kwargs={"job_id": wrong_type, "request": {"prompt": 5, "num_beams": "many"}}, task_id=wrong_type)
        sender.send_task(keys.TASK_GENERATE, args=[1, 2], kwargs={"job_id": positional, "request": {"prompt": "hi"}}, task_id=positional)
        sender.send_task(keys.TASK_GENERATE, kwargs={"job_id": not_an_object, "request": "not an object"}, task_id=not_an_object)
        sender.send_task(keys.TASK_GENERATE, kwargs={"request": {"prompt": "a message without a job id"}})
        sender.send_task(keys.TASK_GENERATE, kwargs={"job_id": {"nested": 1}, "request": None})
    finally:
        sender.close()
    for entry in ("this is not a Celery message", "{}", "[1, 2]", '{"body": "x", "properties": {}}', "\x00\xff"):
        live_client.redis.lpush(keys.QUEUE_INTERACTIVE, entry)

    for job_id, parameter in [(wrong_type, "prompt"), (positional, "message"), (not_an_object, "request")]:
        record = wait_for_record(live_client, job_id)
        assert record.state is JobState.FAILED, record
        assert record.error.code is ErrorCode.INVALID_REQUEST and record.error.parameter == parameter
        assert record.attempts == 0, "never generated"
    (after,) = run_all(live_client, [{"prompt": "still serving?", "num_beams": 1, "max_new_tokens": 4}])
    assert after.state is JobState.SUCCEEDED
    assert "its kwargs' job_id differs from its id header" in worker.log


def test_the_async_client_does_the_same(redis_server, worker):
    async def scenario():
        async with AsyncJobClient(Settings(redis_url=redis_server.url)) as client:
            job_id = await client.submit({"prompt": "你好", "preset": "greedy", "max_new_tokens": 6})
            assert await client.status(job_id) in (JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED)
            record = await client.wait(job_id, 60)
            assert (await client.get(job_id)) == record
            return record

    record = asyncio.run(scenario())
    assert record.state is JobState.SUCCEEDED and len(record.result.sequences[0].token_ids) <= 6
