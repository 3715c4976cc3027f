"""High availability with Redis Sentinel, all real processes on loopback: a primary, a replica and three
sentinels; a worker and a client on a sentinel:// URL; the primary SIGKILLed mid-run (tests/failover.py)."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from producer import keys
from producer.client import JobClient
from producer.records import JobState, StreamChunk, StreamEnd
from producer.settings import Settings
from tests.failover import run_failover
from tests.sentinels import SentinelGroup
from tests.test_cli import cli
from tests.test_reliability import FAST_REDELIVERY
from tests.waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def group():
    with SentinelGroup() as group:
        yield group


@pytest.fixture(scope="module")
def ha_worker(group, start_worker, bloom_config):
    return start_worker(bloom_config, name="ha@tests", redis_url=group.url, env=FAST_REDELIVERY)


def test_with_wait_no_returned_submit_is_lost_when_the_primary_dies_holding_writes_no_replica_has(group, ha_worker):
    run = run_failover(group, jobs=300, tag="waited", wait_replicas=1, wait_timeout_ms=500, partitioned=True)
    print(run.summary())
    assert run.submitted == 300 and run.held_bytes > 0, "the primary died holding writes its replica did not have"
    assert run.lost == [], "every submit that returned was on the replica"
    assert run.refused > 0, "the submits made while the link held were refused, not confirmed"
    assert run.unchanged_after_rejoin
    assert ha_worker.alive(), "the worker followed the failover by itself"


def test_a_failover_loses_no_job_while_the_replica_keeps_up_and_the_old_primary_rejoins_as_a_replica(group, ha_worker):
    run = run_failover(group, jobs=300, tag="plain")
    print(run.summary())
    assert run.submitted == 300
    assert run.lost == [] and run.two_finals == []
    assert run.unchanged_after_rejoin
    assert ha_worker.alive()


def test_the_cli_a_gateway_a_wait_and_a_stream_on_the_sentinel_url_carry_on_across_a_failover(group, ha_worker, start_gateway):
    url = group.url
    submitted = cli(url, "submit", "--prompt", "hello", "--set", "num_beams=1", "--set", "max_new_tokens=3", "--wait", "60", "--json")
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["state"] == "succeeded"
    gateway = start_gateway(url)
    with JobClient(Settings(redis_url=url)) as client:
        job_id = client.submit({"prompt": "a long one", "num_beams": 1, "max_new_tokens": 150, "min_new_tokens": 100, "stream": True})
        outcome: dict = {}
        waiting = threading.Thread(target=lambda: outcome.__setitem__("record", client.wait(job_id, 180)))
        streaming = threading.Thread(target=lambda: outcome.__setitem__("events", list(client.stream(job_id, 180))))
        waiting.start()
        streaming.start()
        wait_for(lambda: client.redis.xlen(keys.job_chunks(job_id)) > 0, 60, "the job is generating")
        old_primary = group.primary_port()
        group.kill(old_primary)  # (not started again: the rest of the run needs no replica)
        wait_for(lambda: group.primary_port() not in (None, old_primary), 60, lambda: f"a replica was promoted:\n{group.logs()}")
        waiting.join(180)
        streaming.join(180)
        record = outcome["record"]
        assert record.state is JobState.SUCCEEDED and record.attempts == 1, "the worker kept the job through the failover"
        events = outcome["events"]
        assert isinstance(events[-1], StreamEnd) and events[-1].state is JobState.SUCCEEDED
        assert "".join(e.text for e in events if isinstance(e, StreamChunk)) == record.text, "the stream went on where it was"
        job = httpx.get(f"{gateway.url}/v1/jobs/{job_id}", timeout=30).json()
        assert job["state"] == "succeeded" and job["result"]["sequences"][0]["text"] == record.text
        posted = httpx.post(f"{gateway.url}/v1/jobs", json={"prompt": "after", "num_beams": 1, "max_new_tokens": 3}, timeout=30)
        assert posted.status_code == 202, posted.text
        assert client.wait(posted.json()["job_id"], 60).state is JobState.SUCCEEDED
        # Cancellations travel by pub/sub: the worker's listener follows the new primary too.
        doomed = client.submit({"prompt": "cancel me", "num_beams": 1, "max_new_tokens": 150, "min_new_tokens": 100})
        wait_for(lambda: client.get(doomed).attempts == 1, 60, "the doomed job is generating")
        client.cancel(doomed)
        ended = client.wait(doomed, 60)
        assert ended.state is JobState.CANCELLED and len(ended.result.sequences[0].token_ids) < 100, "stopped mid-generation"
    status = cli(url, "status", job_id)
    assert (status.returncode, status.stdout.strip()) == (0, "succeeded")
    assert ha_worker.alive()
