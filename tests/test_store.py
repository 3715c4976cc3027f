"""Job record transitions against a real redis-server."""

from __future__ import annotations

import json
import time

import pytest

from producer import keys
from producer.client import JobClient
from producer.enqueue import new_job_id
from producer.connection import redis_client
from producer.errors import ErrorCode
from producer.records import JobError, JobState
from producer.schemas import parse_request
from producer.settings import Settings
from producer.store import canonical_json
from worker.serving.job_writes import WorkerJobStore

REQUEST = canonical_json(parse_request({"prompt": "hi"}).to_wire())  # as a job's record and its message hold it
UNSERVED = "belle.tests.unserved"  # a queue no worker consumes: its jobs stay queued


@pytest.fixture
def store(redis_server):
    r = redis_client(redis_server.url)
    yield WorkerJobStore(r, result_ttl_s=100, pending_ttl_s=1000)
    r.close()


@pytest.fixture
def submit(redis_server):
    """``submit()``: a job enqueued the way clients enqueue (its record and its message), to a queue no worker consumes."""
    with JobClient(Settings(redis_url=redis_server.url, pending_ttl_s=1000)) as client:
        yield lambda: client.submit({"prompt": "hi"}, queue=UNSERVED)


def error(code=ErrorCode.GENERATION_ERROR) -> JobError:
    return JobError(code=code, message="boom")


def test_life_cycle_and_attempts(store, submit):
    job = submit()
    assert store.get(job).state is JobState.QUEUED and store.get(job).attempts == 0
    assert store.redis.ttl(keys.job(job)) > 900
    first = store.start(job, worker="w1", request_json=REQUEST, max_attempts=3)
    assert first.should_run and first.attempts == 0 and first.queued_s >= 0
    store.generating([job], holder="w1")  # an attempt counts once the job starts generating
    second = store.start(job, worker="w2", request_json=REQUEST, max_attempts=3)  # w1 was lost (it has no liveness key)
    assert second.attempts == 1
    store.generating([job], holder="w1")  # no longer w1's job: not counted
    store.generating([job], holder="w2")
    record = store.get(job)
    assert record.state is JobState.RUNNING and record.worker == "w2" and record.started_at >= record.created_at and record.attempts == 2


def test_the_first_final_write_wins(store, submit):
    job = submit()
    store.start(job, worker="w", request_json=REQUEST, max_attempts=3)
    assert store.fail(job, error()) == "ok"
    assert store.fail(job, error(ErrorCode.OUT_OF_MEMORY)) == "failed"
    record = store.get(job)
    assert record.state is JobState.FAILED and record.error.code is ErrorCode.GENERATION_ERROR
    assert 0 < store.redis.ttl(keys.job(job)) <= 100
    # A redelivered message for a finished job is not run again.
    assert store.start(job, worker="w", request_json=REQUEST, max_attempts=3).outcome == "final:failed"


def test_attempts_stop_at_the_poison_limit(store, submit):
    job = submit()
    for attempt in range(2):
        assert store.start(job, worker=f"w{attempt}", request_json=REQUEST, max_attempts=2).should_run
        store.generating([job], holder=f"w{attempt}")
    exhausted = store.start(job, worker="w2", request_json=REQUEST, max_attempts=2)
    assert exhausted.outcome == "exhausted" and exhausted.attempts == 2


def test_a_message_whose_request_differs_from_the_record_leaves_it_alone(store, submit):
    job = submit()
    outcome = store.start(job, worker="w", request_json=canonical_json({"prompt": "forged"}), max_attempts=3)
    assert outcome.outcome == "mismatch"
    record = store.get(job)
    assert record.state is JobState.QUEUED and record.attempts == 0 and record.request == json.loads(REQUEST)


def test_a_message_that_carries_its_request_and_has_no_record_creates_one(store):
    """(A message of an earlier version carries its request; one that does not, and has no record, cannot run:
    tests/test_redis_cost.py.)"""
    job = new_job_id()
    assert store.start(job, worker="w", request_json=REQUEST, max_attempts=3).should_run
    store.fail(job, error(ErrorCode.INVALID_REQUEST))
    record = store.get(job)
    assert record.state is JobState.FAILED and record.attempts == 0 and record.request == json.loads(REQUEST)


def test_only_a_jobs_end_is_published_on_its_channel(store, submit):
    """A wait needs the end only: starting a job publishes nothing (one command less per job)."""
    job = submit()  # (enqueueing publishes nothing)
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.job_channel(job))
    store.start(job, worker="w", request_json=REQUEST, max_attempts=3)
    store.fail(job, error())
    events = []
    deadline = time.monotonic() + 5
    while not events and time.monotonic() < deadline:
        # With ignore_subscribe_messages the subscription confirmation reads as None: keep reading.
        if (message := pubsub.get_message(timeout=0.5)) is not None:
            events.append(json.loads(message["data"]))
    assert pubsub.get_message(timeout=0.5) is None, "nothing after the end"
    pubsub.close()
    assert [(e["event"], e["state"]) for e in events] == [("end", "failed")]


def test_a_job_running_on_a_live_worker_is_not_taken_over_by_a_duplicate_message(store, submit):
    job = submit()
    store.redis.set(keys.worker_alive("alive-1"), 1, ex=60)
    assert store.start(job, worker="a", holder="alive-1", request_json=REQUEST, max_attempts=3).should_run
    assert store.start(job, worker="a", holder="alive-1", request_json=REQUEST, max_attempts=3).outcome == "held_here"
    assert store.start(job, worker="b", holder="b-1", request_json=REQUEST, max_attempts=3).outcome == "held"
    assert store.get(job).worker == "a"
    store.redis.delete(keys.worker_alive("alive-1"))  # the holder died: its job is taken over
    assert store.start(job, worker="b", holder="b-1", request_json=REQUEST, max_attempts=3).should_run
    assert store.get(job).worker == "b"
    # Its holder's own start, retried after a lost reply: the holder takes it (it is not handling it twice).
    assert store.start(job, worker="b", holder="b-1", request_json=REQUEST, max_attempts=3).outcome == "held_here"
    assert store.start(job, worker="b", holder="b-1", request_json=REQUEST, max_attempts=3, take_over=True).should_run


def test_a_record_from_before_the_queue_keys_were_stored_still_starts(store, submit):
    job = submit()
    store.redis.hdel(keys.job(job), "k_sequence", "k_waiting", "k_taken")  # numbered on its queue, but without the names of the queue's keys
    assert store.start(job, worker="a", holder="a-1", request_json=REQUEST, max_attempts=3).should_run


def test_a_job_ending_after_its_batch_expired_does_not_recreate_the_batch(store, submit):
    job = submit()
    store.redis.hset(keys.job(job), mapping={"batch": keys.batch("gone"), "batch_id": "gone"})
    assert store.start(job, worker="a", holder="a-1", request_json=REQUEST, max_attempts=3).should_run
    assert not store.redis.exists(keys.batch("gone"))


def test_every_lua_script_has_its_header_and_compiles(store):
    from producer import lua
    from worker.serving import lua as worker_lua

    for folder in (lua.FOLDER, worker_lua.FOLDER):
        for path in sorted(folder.glob("*.lua")):
            text = path.read_text(encoding="utf-8").removeprefix("#!lua flags=allow-oom\n")  # (a script flag must be its first line)
            assert text.startswith("-- ") and "KEYS" in text.split("\n\n")[0], f"{path.name}: a header comment saying its KEYS and ARGV"
            source = lua.script(path.stem, folder)
            assert "-- include:" not in source
            store.redis.script_load(source)  # compiles: a syntax error, or a fragment missing, fails here


@pytest.mark.parametrize("holder_alive", [False, True])
def test_a_message_kombu_sends_back_takes_its_dead_holders_job_back_to_queued(redis_server, store, submit, holder_alive):
    """kombu's own redelivery (the visibility timeout) puts a dead worker's message back on its queue; the job's
    record, still running under that worker, goes back to queued with it, numbered on its queue, so that the
    lost-message sweep covers it should its message be lost once more. A live holder's job is left alone."""
    from kombu import Connection

    from worker.serving.redis_writes import RedisWrites
    from worker.serving.transport import bound_transport
    from worker.serving.unacked import new_delivery_tag

    job = submit()
    raw = next(m for m in store.redis.lrange(UNSERVED, 0, -1) if json.loads(m)["headers"]["id"] == job)
    assert store.redis.lrem(UNSERVED, 1, raw) == 1  # a worker takes the message...
    holder = f"w@tests/1/{'alive' if holder_alive else 'dead'}"
    tag = new_delivery_tag(holder)
    store.redis.hset("unacked", tag, json.dumps([json.loads(raw), "", UNSERVED]))  # ...records it in hand, as kombu does...
    store.redis.zadd("unacked_index", {tag: time.time() - 7200})
    assert store.start(job, worker="w", request_json=REQUEST, max_attempts=3, holder=holder).should_run  # ...and starts the job
    if holder_alive:
        store.redis.set(keys.worker_alive(holder), 1, ex=60)
    connection = Connection(redis_server.url, transport=bound_transport(writes=RedisWrites(), incarnation="w2@tests/2/x", on_refused=None))
    try:
        channel = connection.default_channel
        channel.qos.restore_by_tag(tag)  # what kombu's restore_visible does for every message past its visibility timeout
    finally:
        connection.release()
    back = [json.loads(m)["headers"]["id"] for m in store.redis.lrange(UNSERVED, 0, -1)]
    assert back.count(job) == 1 and not store.redis.hexists("unacked", tag), "the message is back on its queue, once"
    record = store.get(job)
    if holder_alive:
        assert record.state is JobState.RUNNING, "a live holder's job is its own"
    else:
        assert record.state is JobState.QUEUED and record.worker is None
        assert store.redis.zscore(keys.queue_waiting(UNSERVED), job) is not None, "numbered on its queue: the sweep covers it"


def test_a_result_written_by_a_newer_worker_reads_in_an_older_client():
    """Clients may be older than workers: a field a worker adds to a result is ignored on reading, not an error."""
    from producer.records import JobResult

    result = {"sequences": [{"index": 0, "text": "hi", "token_ids": [1], "finish_reason": "eos", "added_later": 1}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
              "timings": {"queued_s": 0.1, "generation_s": 0.2, "batch_size": 1, "a_hop_from_the_future": 0.3},
              "model": "m", "prompt_fit": {"context_length": 512}}
    parsed = JobResult.model_validate(result)
    assert parsed.sequences[0].text == "hi" and parsed.timings.generation_s == 0.2


def test_a_message_an_earlier_version_recorded_in_hand_goes_back_when_its_holder_dies(store, submit):
    """Workers before issue 20 named a message's holder in a hash (delivery tag → holder), not in its tag: during
    a rolling upgrade, such a worker's messages still go back soon after it dies, and that record is cleared."""
    from tests.waiting import wait_for
    from worker.serving.unacked import LEGACY_HOLDER_OF, HeldMessages

    job = submit()
    raw = next(m for m in store.redis.lrange(UNSERVED, 0, -1) if json.loads(m)["headers"]["id"] == job)
    assert store.redis.lrem(UNSERVED, 1, raw) == 1  # an old worker takes the message...
    holder, tag = "old@tests/1/legacy", "0f55134c7d6949e090e7dbb2b87ab3b4"
    store.redis.zadd("unacked_index", {tag: time.time()})
    store.redis.hset("unacked", tag, json.dumps([json.loads(raw), "", UNSERVED]))
    store.redis.hset(LEGACY_HOLDER_OF, tag, holder)  # ...records it as its own the old way...
    store.redis.sadd(keys.HOLDERS, holder)
    assert store.start(job, worker="old", request_json="", max_attempts=3, holder=holder).should_run  # ...starts it, and dies
    held = HeldMessages(store.redis, confirm_after_s=0)
    wait_for(lambda: held.reclaim_dead().get(holder), 30, "the dead old worker's message went back to its queue")
    assert [json.loads(m)["headers"]["id"] for m in store.redis.lrange(UNSERVED, 0, -1)].count(job) == 1
    assert store.get(job).state is JobState.QUEUED
    assert not store.redis.hexists(LEGACY_HOLDER_OF, tag) and not store.redis.sismember(keys.HOLDERS, holder)
