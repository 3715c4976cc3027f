"""Streaming and cancellation through a real redis-server and real worker processes."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import yaml

from producer import keys
from producer.aio import AsyncJobClient
from producer.client import JobClient
from producer.errors import ErrorCode, JobNotFoundError
from producer.records import FinishReason, JobState, StreamChunk, StreamEnd
from producer.settings import Settings
from tests.test_cli import cli
from tests.waiting import wait_for

STREAMING = {"num_beams": 1, "max_new_tokens": 24, "min_new_tokens": 24, "stream": True}


def follow(client, job_id: str, timeout: float = 60):
    events = list(client.stream(job_id, timeout))
    assert isinstance(events[-1], StreamEnd) and all(isinstance(e, StreamChunk) for e in events[:-1])
    return events[:-1], events[-1]


def test_a_streamed_job_can_be_followed_live_and_replayed_after_it_finished(live_client):
    job_id = live_client.submit({"prompt": "请解释什么是人工智能 🚀", **STREAMING})
    live, end = follow(live_client, job_id)
    record = live_client.get(job_id)
    assert record.state is JobState.SUCCEEDED and end.state is JobState.SUCCEEDED
    assert end.finish_reasons == [s.finish_reason for s in record.result.sequences]
    assert [c.seq for c in live] == list(range(len(live))) and len(live) > 1
    assert "".join(c.text for c in live) == record.text
    # A subscriber that arrives after the end gets the same chunks from the first one.
    replay, _ = follow(live_client, job_id)
    assert replay == live
    assert live_client.redis.ttl(keys.job_chunks(job_id)) > 0, "the stream expires with the record"


def test_two_streaming_jobs_in_one_batch_stay_separate(live_client):
    # 96 steps each: the second message reaches the worker while the first decodes, even on a busy machine.
    ids = [live_client.submit({"prompt": p, **STREAMING, "max_new_tokens": 96, "min_new_tokens": 96}) for p in ("北京是中国的首都", "The quick brown fox 😀")]
    for job_id in ids:
        chunks, _ = follow(live_client, job_id)
        record = live_client.get(job_id)
        assert {c.job_id for c in chunks} == {job_id}
        assert "".join(c.text for c in chunks) == record.text
    assert live_client.get(ids[0]).result.timings.batch_size == 2


def test_a_job_that_does_not_stream_still_ends_a_stream_call_with_its_text(live_client):
    job_id = live_client.submit({"prompt": "你好", "num_beams": 1, "max_new_tokens": 6})
    chunks, end = follow(live_client, job_id)
    assert "".join(c.text for c in chunks) == live_client.get(job_id).text and end.state is JobState.SUCCEEDED
    assert not live_client.redis.exists(keys.job_chunks(job_id)), "a non-streaming job writes no stream"


def test_the_async_client_streams_too(redis_server, worker):
    async def scenario():
        async with AsyncJobClient(Settings(redis_url=redis_server.url)) as client:
            job_id = await client.submit({"prompt": "写一篇关于环保的短文", **STREAMING})
            events = [e async for e in client.stream(job_id, 60)]
            return events, await client.get(job_id)

    events, record = asyncio.run(scenario())
    assert isinstance(events[-1], StreamEnd)
    assert "".join(e.text for e in events[:-1]) == record.text


def test_streaming_with_beams_is_refused_with_the_reason(live_client):
    with pytest.raises(ValueError, match=r"stream requires num_beams=1 \(beam search knows its best sequence only at the end\)"):
        live_client.submit({"prompt": "hi", "num_beams": 2, "stream": True})


def test_the_cli_watches_and_submits_with_stream(redis_server, live_client):
    done = cli(redis_server.url, "submit", "--prompt", "请解释什么是人工智能", "--stream", "--set", "num_beams=1", "--set", "max_new_tokens=12",
               "--set", "min_new_tokens=12")
    assert done.returncode == 0, done.stderr
    job_id = done.stderr.strip().splitlines()[0]
    assert done.stdout == live_client.get(job_id).text + "\n"
    watched = cli(redis_server.url, "watch", job_id, "--json")
    lines = [json.loads(line) for line in watched.stdout.splitlines()]
    assert watched.returncode == 0 and lines[-1]["event"] == "end" and lines[-1]["state"] == "succeeded"
    assert "".join(line["text"] for line in lines[:-1]) == live_client.get(job_id).text


# --- cancellation ---


@pytest.fixture(scope="module")
def long_worker_url(new_database, start_worker, tiny_llama, tmp_path_factory):
    """A Redis database with its own worker, serving the tiny LLaMA (which rarely ends on its own) with a
    context long enough for jobs that run for seconds. The worker starts on first use."""
    url = new_database()
    config = tmp_path_factory.mktemp("configs") / "tiny-llama-long.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny-llama-long", "path": str(tiny_llama), "context_length": 2048}))
    started = []

    def start():
        if not started:
            started.append(start_worker(config, name="long@tests", redis_url=url, env={"BELLE_BATCH_WAIT_MS": "200"}))
        return started[0]

    return url, start


def test_cancelling_a_queued_job_ends_it_without_running(long_worker_url):
    url, start = long_worker_url
    with JobClient(Settings(redis_url=url)) as client:
        job_id = client.submit({"prompt": "never runs", "num_beams": 1, "max_new_tokens": 8, "stream": True})
        outcome = client.cancel(job_id)
        assert outcome.outcome == "cancelled"
        record = client.get(job_id)
        assert record.state is JobState.CANCELLED and record.error.code is ErrorCode.CANCELLED and record.attempts == 0
        chunks, end = follow(client, job_id, 5)
        assert chunks == [] and end.state is JobState.CANCELLED
        # A worker that then takes the message acknowledges it without running the job.
        worker = start()
        after = client.wait(client.submit({"prompt": "behind it", "num_beams": 1, "max_new_tokens": 4}), 60)
        assert after.state is JobState.SUCCEEDED
        assert client.get(job_id) == record
        assert f"job {job_id} is already cancelled" in worker.log
        assert client.cancel(job_id).outcome == "final:cancelled"
        assert "nothing to cancel" in client.cancel(job_id).description
        with pytest.raises(JobNotFoundError):
            client.cancel("no-such-job")


def test_cancelling_a_running_job_keeps_its_partial_text_and_spares_its_batch_mate(long_worker_url):
    url, start = long_worker_url
    start()
    # Same generation parameters, so the three share a batch; stream is not part of a batch's key.
    request = {"num_beams": 1, "max_new_tokens": 600, "min_new_tokens": 100, "stream": True}
    with JobClient(Settings(redis_url=url)) as client:
        mate_alone = client.wait(client.submit({"prompt": "今天天气很好", **request, "stream": False}), 120)
        victim = client.submit({"prompt": "写一篇关于太空探索的科幻短文", **request})
        mate = client.submit({"prompt": "今天天气很好", **request, "stream": False})
        mate_twin = client.submit({"prompt": "今天天气很好", **request})
        events = []
        reader = threading.Thread(target=lambda: events.extend(client.stream(victim, 120)))
        reader.start()
        # Cancelled once the victim and the twin both stream: all three decode together then, however the
        # messages arrived (the mate, ahead of the twin in line, joined no later than it).
        wait_for(lambda: events and client.redis.exists(keys.job_chunks(mate_twin)), 60, "the victim and the twin stream")
        assert client.cancel(victim).outcome == "requested"
        reader.join(120)

        record = client.wait(victim, 60)
        assert record.state is JobState.CANCELLED and record.cancel_requested_at is not None
        (sequence,) = record.result.sequences
        assert sequence.finish_reason is FinishReason.CANCELLED and 0 < len(sequence.token_ids) < 600
        assert isinstance(events[-1], StreamEnd) and events[-1].state is JobState.CANCELLED
        assert events[-1].finish_reasons == [FinishReason.CANCELLED]
        assert "".join(e.text for e in events[:-1]) == sequence.text
        # The jobs that ran beside it finished normally, with what they produce alone.
        for job_id in (mate, mate_twin):
            other = client.wait(job_id, 120)
            assert other.state is JobState.SUCCEEDED
            assert other.result.sequences == mate_alone.result.sequences
        assert client.get(mate).result.timings.batch_size == 3
        assert client.cancel(victim).outcome == "final:cancelled"
