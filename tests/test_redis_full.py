"""Redis at its maxmemory (policy noeviction) refuses writes: clients raise a typed error and the CLI
says so in one line (exit 4); an interrupted batch says how to resume, and resuming enqueues exactly
the missing lines; a worker stays up, takes no new message, keeps what it holds, says so in its
announcement and metrics, and resumes by itself once memory frees up, every accepted job ending once."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import urllib.request

import pytest

from producer import keys
from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis, free_port
from producer.errors import RedisFullError
from producer.records import JobState
from producer.settings import Settings
from tests.test_cli import cli
from tests.test_reliability import EndEvents
from tests.waiting import wait_for

REQUEST = {"prompt": "fill the memory " * 5, "num_beams": 1, "max_new_tokens": 40, "min_new_tokens": 40}


@pytest.fixture
def small_redis():
    with EmbeddedRedis(args=["--maxmemory-policy", "noeviction"], ephemeral=True) as server:
        yield server


def limit_memory(client: JobClient, room: int) -> None:
    """maxmemory = what Redis uses now + ``room`` bytes."""
    client.redis.config_set("maxmemory", client.redis.info("memory")["used_memory"] + room)


def fill(client: JobClient, request: dict = REQUEST) -> list[str]:
    """Submit until Redis refuses; the ids of the jobs it accepted."""
    accepted = []
    with pytest.raises(RedisFullError) as refusal:
        for _ in range(100_000):
            accepted.append(client.submit(request))
    assert "refuses writes" in str(refusal.value) and "maxmemory" in str(refusal.value)
    return accepted


def test_clients_and_the_cli_say_redis_is_full_and_an_interrupted_batch_resumes_with_exactly_the_missing_lines(small_redis, tmp_path):
    with JobClient(Settings(redis_url=small_redis.url)) as client:
        limit_memory(client, 1_000_000)
        accepted = fill(client)
        assert accepted, "some jobs went in before Redis was full"
        done = cli(small_redis.url, "submit", "--prompt", "one more")
        assert done.returncode == 4 and "refuses writes" in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr

        lines = [json.dumps({"custom_id": f"c{i}", "prompt": f"line {i} " + "x" * 1000, "num_beams": 1}) for i in range(300)]
        (tmp_path / "batch.jsonl").write_text("\n".join(lines) + "\n")
        limit_memory(client, 400_000)  # room for some of the lines, not all
        done = cli(small_redis.url, "batch", "submit", str(tmp_path / "batch.jsonl"))
        assert done.returncode == 4 and "Traceback" not in done.stderr, done.stderr
        interrupted = re.search(r"batch (\S+) was interrupted after (\d+) of its 300 lines were in: .*refuses writes.*--batch-id (\S+)", done.stderr)
        assert interrupted, done.stderr
        batch_id, before = interrupted.group(1), int(interrupted.group(2))
        assert interrupted.group(3) == batch_id and 0 < before < 300
        assert client.batch_status(batch_id).state == "submitting"
        assert client.redis.llen(keys.batch_jobs(batch_id)) == before

        client.redis.config_set("maxmemory", 0)  # memory freed (here: the limit lifted)
        done = cli(small_redis.url, "batch", "submit", str(tmp_path / "batch.jsonl"), "--batch-id", batch_id, "--json")
        assert done.returncode == 0, done.stderr
        resumed = json.loads(done.stdout)
        assert (resumed["total"], resumed["created"]) == (300, 300 - before), "exactly the missing lines were enqueued"
        job_ids = client.redis.lrange(keys.batch_jobs(batch_id), 0, -1)
        assert len(job_ids) == len(set(job_ids)) == 300
        status = client.batch_status(batch_id)
        assert (status.state, status.total, status.queued) == ("submitted", 300, 300)


def test_a_worker_keeps_what_it_holds_while_redis_is_full_and_resumes_by_itself(small_redis, start_worker, bloom_config):
    metrics_port = free_port()
    ends = EndEvents(small_redis.url)
    try:
        with JobClient(Settings(redis_url=small_redis.url)) as client:
            worker = start_worker(bloom_config, name="full@tests", redis_url=small_redis.url, env={"BELLE_METRICS_PORT": str(metrics_port)})
            limit_memory(client, 2_000_000)
            accepted = fill(client)
            # A producer goes on submitting, so that Redis stays at its limit while the worker frees what it can.
            producing = threading.Event()
            producing.set()

            def keep_submitting() -> None:
                until = time.monotonic() + 300  # should the test fail before it stops the producer
                with JobClient(Settings(redis_url=small_redis.url)) as producer:
                    while producing.is_set() and time.monotonic() < until:
                        try:
                            accepted.append(producer.submit(REQUEST))
                        except RedisFullError:
                            producing.wait(0.02)

            producer = threading.Thread(target=keep_submitting)
            producer.start()

            def metric(name: str) -> float | None:
                text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
                found = re.search(rf"^{name} (\S+)$", text, re.M)
                return float(found.group(1)) if found else None

            wait_for(lambda: metric("belle_redis_refusing_writes") == 1.0, 60, "the worker's metrics say Redis refuses its writes")
            if int(client.redis.info("server")["redis_version"].split(".")[0]) >= 7:  # (scripts flagged allow-oom: Redis 7)
                wait_for(lambda: any(w.redis_refusing_writes_since for w in client.workers()), 30, "the announcement says so")
            assert [w.name for w in client.workers()] == ["full@tests"], "the announcement stays while Redis is full"
            assert worker.alive(), worker.log[-3000:]
            producing.clear()
            producer.join(30)
            waiting = client.redis.llen(keys.QUEUE_INTERACTIVE)

            client.redis.config_set("maxmemory", 0)  # memory freed
            records = [client.wait(job_id, 300) for job_id in accepted]
            assert all(r.state is JobState.SUCCEEDED for r in records), {(r.state, r.error.message if r.error else None) for r in records if r.state is not JobState.SUCCEEDED}
            wait_for(lambda: not client.redis.hlen(keys.UNACKED) and not client.redis.llen(keys.QUEUE_INTERACTIVE), 60,
                     lambda: f"every message acknowledged (unacked {client.redis.hlen(keys.UNACKED)}); log:\n"
                     + "".join(line for line in worker.lines if " INFO " not in line)[-6000:])
            wait_for(lambda: metric("belle_redis_refusing_writes") == 0.0, 30, "the metrics say Redis takes writes again")
            wait_for(lambda: client.workers() and not client.workers()[0].redis_refusing_writes_since, 30, "the announcement says so too")
            assert worker.alive()
            assert "redis refuses writes" in worker.log and "Traceback" not in worker.log
            worker.stop()  # before its Redis goes away with this test
        wait_for(lambda: all(ends.ends[j] for j in accepted), 30, "every job's end was published")
    finally:
        ends.close()
    assert {j: ends.ends[j] for j in accepted} == dict.fromkeys(accepted, 1), "exactly one final record per job"
    print(f"{len(accepted)} jobs accepted, all succeeded once; {waiting} waited in the queue while Redis was full")


def test_a_worker_stopped_while_redis_is_full_leaves_every_job_to_the_next_one(small_redis, start_worker, bloom_config):
    """SIGTERM while its writes wait: what it holds stays unacknowledged (the message it had just taken
    goes back to its queue), it exits, and once memory is freed the next worker sends its messages back
    (it is dead) and runs them: every accepted job ends once. Default visibility timeout (an hour)."""
    ends = EndEvents(small_redis.url)
    try:
        with JobClient(Settings(redis_url=small_redis.url)) as client:
            first = start_worker(bloom_config, name="stopped@tests", redis_url=small_redis.url)
            limit_memory(client, 1_500_000)
            accepted = fill(client)
            for _ in range(3):  # keep it full for a few more tries while the worker frees what it can
                with contextlib.suppress(RedisFullError):
                    accepted.append(client.submit(REQUEST))
            wait_for(lambda: "redis refuses writes" in first.log, 60, "the worker met the refusal")
            assert first.stop(timeout=120) == 0, first.log[-3000:]
            assert "Traceback" not in first.log, first.log[first.log.index("Traceback") - 2000:][:5000]
            client.redis.config_set("maxmemory", 0)
            second = start_worker(bloom_config, name="next@tests", redis_url=small_redis.url)
            records = [client.wait(job_id, 300) for job_id in accepted]
            assert all(r.state is JobState.SUCCEEDED for r in records), {(r.state, r.error.message if r.error else None) for r in records
                                                                         if r.state is not JobState.SUCCEEDED}
            wait_for(lambda: not client.redis.hlen(keys.UNACKED), 60, "every message acknowledged")
            assert second.alive()
            second.stop()  # before its Redis goes away with this test
        wait_for(lambda: all(ends.ends[j] for j in accepted), 30, "every job's end was published")
    finally:
        ends.close()
    assert {j: ends.ends[j] for j in accepted} == dict.fromkeys(accepted, 1), "exactly one final record per job"
