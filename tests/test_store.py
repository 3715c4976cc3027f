"""Job record transitions against a real redis-server."""

from __future__ import annotations

import json
import time

import pytest

from producer import keys
from producer.enqueue import new_job_id
from producer.connection import redis_client
from producer.errors import ErrorCode
from producer.records import JobError, JobState
from producer.store import JobStore, canonical_json

REQUEST = canonical_json({"prompt": "hi"})


@pytest.fixture
def store(redis_server):
    r = redis_client(redis_server.url)
    yield JobStore(r, result_ttl_s=100, pending_ttl_s=1000)
    r.close()


def error(code=ErrorCode.GENERATION_ERROR) -> JobError:
    return JobError(code=code, message="boom")


def test_life_cycle_and_attempts(store):
    job = new_job_id()
    store.create(job, REQUEST)
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


def test_the_first_final_write_wins(store):
    job = new_job_id()
    store.create(job, REQUEST)
    store.start(job, worker="w", request_json=REQUEST, max_attempts=3)
    assert store.fail(job, error()) == "ok"
    assert store.fail(job, error(ErrorCode.OUT_OF_MEMORY)) == "failed"
    record = store.get(job)
    assert record.state is JobState.FAILED and record.error.code is ErrorCode.GENERATION_ERROR
    assert 0 < store.redis.ttl(keys.job(job)) <= 100
    # A redelivered message for a finished job is not run again.
    assert store.start(job, worker="w", request_json=REQUEST, max_attempts=3).outcome == "final:failed"


def test_attempts_stop_at_the_poison_limit(store):
    job = new_job_id()
    store.create(job, REQUEST)
    for attempt in range(2):
        assert store.start(job, worker=f"w{attempt}", request_json=REQUEST, max_attempts=2).should_run
        store.generating([job], holder=f"w{attempt}")
    exhausted = store.start(job, worker="w2", request_json=REQUEST, max_attempts=2)
    assert exhausted.outcome == "exhausted" and exhausted.attempts == 2


def test_a_message_whose_request_differs_from_the_record_leaves_it_alone(store):
    job = new_job_id()
    store.create(job, REQUEST)
    outcome = store.start(job, worker="w", request_json=canonical_json({"prompt": "forged"}), max_attempts=3)
    assert outcome.outcome == "mismatch"
    record = store.get(job)
    assert record.state is JobState.QUEUED and record.attempts == 0 and record.request == {"prompt": "hi"}


def test_a_message_without_a_record_creates_one(store):
    job = new_job_id()
    assert store.start(job, worker="w", request_json="", max_attempts=3).should_run
    store.fail(job, error(ErrorCode.INVALID_REQUEST))
    record = store.get(job)
    assert record.state is JobState.FAILED and record.attempts == 0 and record.request is None


def test_transitions_publish_events(store):
    job = new_job_id()
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.job_channel(job))
    store.create(job, REQUEST)
    store.start(job, worker="w", request_json=REQUEST, max_attempts=3)
    store.fail(job, error())
    events = []
    deadline = time.monotonic() + 5
    while len(events) < 2 and time.monotonic() < deadline:
        # With ignore_subscribe_messages the subscription confirmation reads as None: keep reading.
        if (message := pubsub.get_message(timeout=0.5)) is not None:
            events.append(json.loads(message["data"]))
    pubsub.close()
    assert [e["state"] for e in events] == ["running", "failed"]


def test_a_job_running_on_a_live_worker_is_not_taken_over_by_a_duplicate_message(store):
    job = new_job_id()
    store.create(job, REQUEST)
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


def test_a_record_from_before_the_queue_keys_were_stored_still_starts(store):
    job = new_job_id()
    store.create(job, REQUEST)
    store.redis.hset(keys.job(job), "seq", 7)  # numbered on its queue, but without the names of the queue's keys
    assert store.start(job, worker="a", holder="a-1", request_json=REQUEST, max_attempts=3).should_run


def test_a_job_ending_after_its_batch_expired_does_not_recreate_the_batch(store):
    job = new_job_id()
    store.create(job, REQUEST)
    store.redis.hset(keys.job(job), mapping={"batch": keys.batch("gone"), "batch_id": "gone"})
    assert store.start(job, worker="a", holder="a-1", request_json=REQUEST, max_attempts=3).should_run
    assert not store.redis.exists(keys.batch("gone"))
