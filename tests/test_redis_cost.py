"""What a job costs Redis (issue 20): the commands of its whole life, counted by a Redis of its own
(``INFO commandstats``; the commands inside Lua scripts count too), and what a waiting job holds."""

from __future__ import annotations

import json

import pytest

from producer import keys, lua
from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.enqueue import task_message
from producer.records import JobResult, StreamChunk
from producer.schemas import WIRE_DEFAULTS, full_form, model_defaults, parse_request, stored_form
from producer.settings import Settings
from producer.store import record_from_hash
from worker.serving.job_writes import WorkerJobStore
from worker.serving.publisher import ChunkPublisher
from worker.serving.redis_writes import RedisWrites
from worker.serving.transport import bound_transport
from worker.serving.unacked import holder_of, new_delivery_tag

HOLDER = "w@tests/1/cost"
RESULT = JobResult.model_validate({"sequences": [{"index": 0, "text": "hi", "token_ids": [1], "finish_reason": "length"}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                                   "timings": {"queued_s": 0.0, "generation_s": 0.0, "batch_size": 1}, "model": "m",
                                   "prompt_fit": {"context_length": 512}})


@pytest.fixture
def own_redis():
    """A Redis of this test's own: no other test's worker adds to its counts."""
    with EmbeddedRedis(ephemeral=True) as server:
        yield server


def commands(r) -> int:
    return sum(int(v["calls"]) for name, v in r.info("commandstats").items() if name.removeprefix("cmdstat_") not in ("info", "config|resetstat"))


@pytest.fixture
def consumer(own_redis):
    """A worker's transport, on one connection (a worker keeps its own): ``consumer(queue)`` takes one message
    off the queue, recorded as held by HOLDER, as the consumer does."""
    from kombu import Connection

    connection = Connection(own_redis.url, transport=bound_transport(writes=RedisWrites(), incarnation=HOLDER, on_refused=None))
    channel = connection.default_channel
    yield lambda queue: channel.basic_get(queue)
    connection.release()


def test_a_plain_job_costs_at_most_30_redis_commands_from_submit_to_wait(own_redis, consumer):
    with JobClient(Settings(redis_url=own_redis.url)) as client:
        store = WorkerJobStore(client.redis, result_ttl_s=100, pending_ttl_s=1000)

        def one_job() -> tuple[int, int]:
            """The commands to submit it, and those of its whole life."""
            client.redis.config_resetstat()
            job = client.submit({"prompt": "hi", "num_beams": 1, "max_new_tokens": 4})
            submitted = commands(client.redis)
            message = consumer(keys.QUEUE_INTERACTIVE)
            assert message.decode()[1] == {"job_id": job}, "the message names the job; its request is in its record"
            start = store.start(job, worker="w", request_json="", max_attempts=3, holder=HOLDER)
            assert start.should_run and json.loads(start.request_json) == {"prompt": "hi", "num_beams": 1, "max_new_tokens": 4}
            store.generating([job], holder=HOLDER)
            assert store.succeed(job, RESULT, streaming=False) == "ok"
            message.ack()
            assert client.wait(job, 10).text == "hi"
            return submitted, commands(client.redis)

        one_job()  # (Redis learns the scripts)
        submitted, total = one_job()
    assert submitted <= 7, f"submitting took {submitted} commands"
    assert total <= 30, f"a plain job took {total} Redis commands end to end"


def test_a_streamed_chunk_costs_one_command_to_write(own_redis):
    with JobClient(Settings(redis_url=own_redis.url)) as client:
        publisher = ChunkPublisher(client.redis, ttl_s=100)
        job = "cost-stream"
        first = [StreamChunk(job_id=job, seq=0, index=0, text="a", tokens=1, attempt=1)]
        publisher.write(first, output_events=set())  # (the stream's expiry comes with its first chunk)
        client.redis.config_resetstat()
        later = [StreamChunk(job_id=job, seq=seq, index=0, text="b", tokens=seq + 1, attempt=1) for seq in range(1, 11)]
        for chunk in later:
            publisher.write([chunk], output_events=set())
        assert commands(client.redis) == len(later)
        assert client.redis.xlen(keys.job_chunks(job)) == 1 + len(later)


def test_luas_message_is_the_producers(own_redis):
    """Fair-share lines hold job ids; the message a job goes on its queue with, made in Lua, is the producer's own."""
    with JobClient(Settings(redis_url=own_redis.url)) as client:
        source = lua._constants() + "return message_for(ARGV[1], ARGV[2])"
        for job_id, queue in (("0f55134c7d6949e090e7dbb2b87ab3b4", keys.QUEUE_BULK), ("a-b_C", 'odd "queue"/x')):
            made = client.redis.eval(source, 0, job_id, queue)
            assert json.loads(made) == json.loads(task_message(job_id, None, queue))


def test_a_waiting_job_stores_its_request_once_and_small(own_redis):
    with JobClient(Settings(redis_url=own_redis.url)) as client:
        job = client.submit({"prompt": "你好", "num_beams": 1, "max_new_tokens": 16, "metadata": {"k": "v"}})
        fields = client.redis.hgetall(keys.job(job))
        assert json.loads(fields["request"]) == {"prompt": "你好", "num_beams": 1, "max_new_tokens": 16, "metadata": {"k": "v"}}
        assert sorted(fields) == ["created_at", "queue", "request", "seq", "state"]
        (message,) = client.redis.lrange(keys.QUEUE_INTERACTIVE, 0, -1)
        assert "你好" not in message and len(message) < 500
        record = record_from_hash(job, fields)
        assert record.request == parse_request({"prompt": "你好", "num_beams": 1, "max_new_tokens": 16, "metadata": {"k": "v"}}).to_wire()


@pytest.mark.parametrize("request_fields", [
    {"prompt": "hi"},
    {"messages": [{"role": "user", "content": "hi"}], "preset": "greedy"},
    {"prompt": "x", "stream": True, "num_beams": 1, "stop": ["\n"], "seed": 3, "temperature": 0.7, "webhook": "https://example.com/h",
     "webhook_events_filter": ["start", "output"]},
])
def test_the_stored_form_of_a_request_gives_its_wire_form_back(request_fields):
    wire = parse_request(request_fields).to_wire()
    stored = stored_form(wire)
    assert full_form(stored) == wire
    assert len(json.dumps(stored)) < len(json.dumps(wire))
    assert full_form({"oversized_request_bytes": 9}) == {"oversized_request_bytes": 9}, "a stand-in is no request"


def test_the_defaults_a_stored_request_leaves_out_are_the_models():
    """A queued job's record holds its request without the fields at their defaults; a default that changed
    would change every request stored before it: that needs a versioned stored form, not an edit here."""
    assert WIRE_DEFAULTS == model_defaults()


def test_a_delivery_tag_names_its_holder():
    tag = new_delivery_tag("belle@gpu-3/1234/0a1b2c3d")
    assert holder_of(tag) == "belle@gpu-3/1234/0a1b2c3d" and holder_of(tag.encode()) == "belle@gpu-3/1234/0a1b2c3d"
    assert new_delivery_tag("h") != new_delivery_tag("h")
    assert holder_of(new_delivery_tag(None)) is None and holder_of("tag-from-elsewhere") is None


def test_a_message_whose_record_expired_fails_the_job_instead_of_running_blind(own_redis):
    with JobClient(Settings(redis_url=own_redis.url)) as client:
        store = WorkerJobStore(client.redis, result_ttl_s=100, pending_ttl_s=1000)
        job = client.submit({"prompt": "hi"})
        client.redis.delete(keys.job(job))  # (its record expired while it waited)
        assert store.start(job, worker="w", request_json="", max_attempts=3, holder=HOLDER).outcome == "missing"


def test_a_worker_ends_expired_a_job_whose_record_expired_before_it_took_the_message(live_client):
    from producer.enqueue import new_job_id
    from producer.errors import ErrorCode
    from producer.records import JobState
    from tests.waiting import wait_for

    job = new_job_id()
    live_client.redis.lpush(keys.QUEUE_INTERACTIVE, task_message(job, None, keys.QUEUE_INTERACTIVE))  # (its record gone)
    wait_for(lambda: live_client.redis.exists(keys.job(job)), 60, "the worker took the message")
    record = live_client.wait(job, 60)
    assert record.state is JobState.EXPIRED and record.error.code is ErrorCode.EXPIRED and "submit the job again" in record.error.message
