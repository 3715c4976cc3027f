"""Chunk streams on Redis servers of their own (BELLE_STREAM_REDIS_URLS, issue 20): a real worker and real
clients, one primary and two stream shards, each a real redis-server."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

import pytest
import yaml

from producer import keys
from producer.aio import AsyncJobClient
from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.enqueue import derived_job_id
from producer.records import JobRecord, JobResult, JobState, StreamChunk, StreamEnd
from producer.settings import Settings, shown_settings
from producer.stream_shards import CLIENT_TIMEOUT_S, shard_of, shard_urls
from producer.streaming import RECHECK_S, StreamFollower
from tests.waiting import wait_for
from worker.serving.job_writes import WorkerJobStore

SHARDS = 2


def test_a_jobs_shard_follows_from_its_id_alone_and_spreads_them():
    ids = [derived_job_id(f"spread-{n}") for n in range(3_000)]
    assert [shard_of(job, 3) for job in ids] == [shard_of(job, 3) for job in ids]
    counts = Counter(shard_of(job, 3) for job in ids)
    assert min(counts.values()) > 800, counts
    assert shard_urls(" redis://a:6379/0, ,redis://b:6379/1 ") == ["redis://a:6379/0", "redis://b:6379/1"]
    assert shard_urls(None) == [] and shard_urls("") == []
    assert CLIENT_TIMEOUT_S > RECHECK_S, "a reader's blocking read must end before its connection gives up"


def entries(*chunks: StreamChunk, end: JobState | None = None) -> list:
    """An XREAD reply of a job's stream holding these chunks (ids 1-0, 2-0...) and, with ``end``, its end event."""
    events = [c.model_dump_json() for c in chunks] + ([StreamEnd(job_id="j", state=end).model_dump_json()] if end else [])
    return [["belle:job:j:chunks", [(f"{n + 1}-0", {"event": e}) for n, e in enumerate(events)]]]


def chunk(seq: int, text: str, attempt: int = 1) -> StreamChunk:
    return StreamChunk(job_id="j", seq=seq, index=0, text=text, tokens=seq + 1, attempt=attempt)


def record(text: str, attempts: int = 1) -> JobRecord:
    return JobRecord(job_id="j", state=JobState.SUCCEEDED, attempts=attempts, result=JobResult.model_validate(
        {"sequences": [{"index": 0, "text": text, "token_ids": [1], "finish_reason": "length"}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, "timings": {"queued_s": 0, "generation_s": 0, "batch_size": 1},
         "model": "m", "prompt_fit": {"context_length": 8}}))


def texts(events) -> str:
    return "".join(e.text for e in events if isinstance(e, StreamChunk))


def test_a_stream_missing_chunks_or_its_end_ends_from_the_record_with_each_piece_of_text_once():
    # Its end event never written (a worker lost after the final state): the rest of the text from the record.
    follower = StreamFollower("j")
    seen = follower.take(entries(chunk(0, "Hel"), chunk(1, "lo ")))
    assert texts(seen + follower.from_record(record("Hello world"))) == "Hello world" and follower.done
    # Chunks missing in the middle (a shard restarted without them): nothing more of the stream, the rest from the record.
    follower = StreamFollower("j")
    seen = follower.take(entries(chunk(0, "Hel"), chunk(2, "wor"), chunk(3, "ld"), end=JobState.SUCCEEDED))
    assert follower.broken and not follower.done and texts(seen) == "Hel"
    assert texts(seen + follower.from_record(record("Hello world"))) == "Hello world"
    # The record is a later attempt's than the chunks seen: its whole text, as that attempt's.
    follower = StreamFollower("j")
    seen = follower.take(entries(chunk(0, "Hel")))
    rest = follower.from_record(record("Bonjour", attempts=2))
    assert texts(rest) == "Bonjour" and rest[0].attempt == 2


def test_a_resumed_reader_gets_only_what_it_had_not():
    first = StreamFollower("j")
    before = first.take_with_ids(entries(chunk(0, "Hel"), chunk(1, "lo ")))
    after_record = first.from_record_with_ids(record("Hello world"))
    assert [i for i, _ in before + after_record] == ["1-0", "2-0", "r-2", "r-end"]
    # After an event made from the record: the stream's chunks were given before it.
    again = StreamFollower("j", after="r-2")
    assert again.take(entries(chunk(0, "Hel"), chunk(1, "lo "))) == []
    assert [type(e) for e in again.from_record(record("Hello world"))] == [StreamEnd]
    assert StreamFollower("j", after="r-end").done
    # After a stream entry, its end missing: the entries up to it tell what was given.
    resumed = StreamFollower("j", after="1-0")
    seen = resumed.take([["k", [("2-0", {"event": chunk(1, "lo ").model_dump_json()})]]])
    assert resumed.needs_history
    resumed.rebuild([("1-0", {"event": chunk(0, "Hel").model_dump_json()}), ("2-0", {"event": chunk(1, "lo ").model_dump_json()})])
    assert texts(seen + resumed.from_record(record("Hello world"))) == "lo world"


def test_every_shard_url_has_its_password_masked():
    shown = shown_settings(Settings(stream_redis_urls="redis://:one@a:6379/0,redis://u:two@b:6379/0"))
    assert "one" not in shown["stream_redis_urls"] and "two" not in shown["stream_redis_urls"]
    assert shown["stream_redis_urls"].count("***") == 2


@pytest.fixture(scope="module")
def servers():
    """A primary and the stream shards, each a redis-server of its own."""
    with EmbeddedRedis(ephemeral=True) as primary, EmbeddedRedis(ephemeral=True) as a, EmbeddedRedis(ephemeral=True) as b:
        yield primary, [a, b][:SHARDS]


@pytest.fixture(scope="module")
def sharded(servers, start_worker, tiny_llama, tmp_path_factory):
    """A worker on the primary with the streams on the shards, serving the tiny LLaMA (which rarely ends on
    its own) with a context long enough for a job that runs until it is cancelled."""
    primary, shards = servers
    urls = ",".join(shard.url for shard in shards)
    config = tmp_path_factory.mktemp("configs") / "tiny-llama-shards.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny-llama-shards", "path": str(tiny_llama), "context_length": 2048}))
    start_worker(config, name="shards@tests", redis_url=primary.url, env={"BELLE_STREAM_REDIS_URLS": urls})
    return Settings(redis_url=primary.url, stream_redis_urls=urls)


def spread_ids(prefix: str, per_shard: int) -> list[str]:
    """Idempotency keys whose jobs' streams fill every shard ``per_shard`` times."""
    keys_by_shard: dict[int, list[str]] = {n: [] for n in range(SHARDS)}
    for n in itertools.count():
        key = f"{prefix}-{n}"
        taken = keys_by_shard[shard_of(derived_job_id(f"idempotency:{key}"), SHARDS)]
        if len(taken) < per_shard:
            taken.append(key)
        if all(len(v) == per_shard for v in keys_by_shard.values()):
            return [key for keys_of in keys_by_shard.values() for key in keys_of]
    raise AssertionError("unreachable")


def stream_text(events) -> tuple[str, StreamEnd]:
    events = list(events)
    assert isinstance(events[-1], StreamEnd) and all(isinstance(e, StreamChunk) for e in events[:-1])
    return "".join(e.text for e in events[:-1]), events[-1]


def test_streams_live_on_their_shards_and_replay_join_late_and_end_there(servers, sharded):
    primary, shards = servers
    request = {"prompt": "写一首诗", "num_beams": 1, "stream": True, "max_new_tokens": 24, "min_new_tokens": 24}
    with JobClient(sharded) as client:
        jobs = [client.submit({**request, "idempotency_key": key}) for key in spread_ids("shards", 3)]
        live_text, live_end = stream_text(client.stream(jobs[0], 120))  # (followed while it runs)
        records = [client.wait(job, 120) for job in jobs]
        assert live_end.state is JobState.SUCCEEDED and live_text == records[0].text
        for job, record in zip(jobs, records, strict=True):
            shard = client.streams.of(job)
            assert shard.connection_pool.connection_kwargs["port"] == shards[shard_of(job, SHARDS)].port
            assert shard.xlen(keys.job_chunks(job)) >= 2 and 0 < shard.ttl(keys.job_chunks(job)) <= sharded.result_ttl_s
            assert not client.redis.exists(keys.job_chunks(job)), "no stream beside the records"
            text, end = stream_text(client.stream(job, 30))  # replayed from its first chunk, after its end
            assert text == record.text and end.state is JobState.SUCCEEDED

        async def replay() -> list[str]:
            async with AsyncJobClient(sharded) as aclient:
                return [stream_text([e async for e in aclient.stream(job, 30)])[0] for job in jobs[:2]] + [await aclient.texts_so_far(jobs[2])]

        assert asyncio.run(replay()) == [records[0].text, records[1].text, [records[2].text]]
    assert {shard_of(job, SHARDS) for job in jobs} == set(range(SHARDS))


def test_a_cancelled_streaming_job_ends_its_shards_stream(sharded):
    with JobClient(sharded) as client:
        job = client.submit({"prompt": "写一首长诗", "num_beams": 1, "stream": True, "max_new_tokens": 1500, "min_new_tokens": 100})
        chunks = client.streams.of(job)
        wait_for(lambda: chunks.xlen(keys.job_chunks(job)) > 0, 120, "the job streams")
        client.cancel(job)
        text, end = stream_text(client.stream(job, 120))
        record = client.wait(job, 30)
        assert end.state is JobState.CANCELLED and record.state is JobState.CANCELLED and text == record.text


def test_a_stream_whose_end_event_is_missing_ends_from_the_record_without_repeating_text(sharded):
    """The end event goes to the shard after the final state: a worker lost between the two leaves a stream
    without it. A reader then ends it from the record, once, with no text twice."""
    with JobClient(sharded) as client:
        job = client.submit({"prompt": "你好", "num_beams": 1, "stream": True, "max_new_tokens": 8, "min_new_tokens": 8})
        record = client.wait(job, 120)
        shard, stream = client.streams.of(job), keys.job_chunks(job)
        ((last_id, _),) = shard.xrevrange(stream, count=1)
        shard.xdel(stream, last_id)
        text, end = stream_text(client.stream(job, 30))
        assert text == record.text and end.state is JobState.SUCCEEDED


def test_a_jobs_second_attempt_streams_from_the_start_on_its_shard(servers, sharded):
    primary, _ = servers
    with JobClient(Settings(redis_url=primary.url, stream_redis_urls=sharded.stream_redis_urls)) as client:
        store = WorkerJobStore(client.redis, result_ttl_s=100, pending_ttl_s=1000, streams=client.streams)
        job = client.submit({"prompt": "hi", "num_beams": 1, "stream": True}, queue="belle.tests.unserved")
        shard, stream = client.streams.of(job), keys.job_chunks(job)
        shard.xadd(stream, {"event": "an earlier attempt's chunk"})
        client.redis.hset(keys.job(job), "attempts", 1)  # (an earlier worker began generating it, then died)
        assert store.start(job, worker="w", request_json="", max_attempts=3, holder="w/1/x").should_run
        assert not shard.exists(stream)
