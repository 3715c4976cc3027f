"""Fair shares of the bulk queue (producer/fairness.py): batches and tenants are served in turn, not first in
first out, while the lost-message sweeper, cancellation and interactive jobs work as before."""

from __future__ import annotations

import json

import pytest

from producer import fairness, keys
from producer.client import JobClient
from producer.connection import redis_client
from producer.errors import ErrorCode
from producer.records import JobError
from producer.settings import Settings
from tests.waiting import wait_for
from worker.serving.job_writes import WorkerJobStore

QUICK = {"num_beams": 1, "max_new_tokens": 1, "min_new_tokens": 1}
READY = 4


def lines(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag} {i}", **QUICK} for i in range(n)]


@pytest.fixture
def queue(new_database):
    """A quiet database, a client whose bulk queue keeps READY jobs ready, and a stand-in for a worker's
    consumer: it takes messages off the bulk queue as kombu does (from its tail) and starts their jobs
    with the worker's own START script, which feeds the queue from the lines."""
    url = new_database()
    client = JobClient(Settings(redis_url=url, bulk_ready_jobs=READY))
    r = redis_client(url)
    store = WorkerJobStore(r, result_ttl_s=60, pending_ttl_s=600, bulk_ready_jobs=READY)
    names: dict[str, str] = {}  # job id → "tag line"

    def take(n: int) -> list[str]:
        taken = []
        for _ in range(n):
            message = r.rpop(keys.QUEUE_BULK)
            if message is None:
                break
            job_id = json.loads(message)["headers"]["id"]
            request = r.hget(keys.job(job_id), "request")
            outcome = store.start(job_id, worker="w", request_json=request, max_attempts=3, holder="w").outcome
            assert outcome in ("run", "final:cancelled"), outcome
            taken.append(names.get(job_id, job_id) + ("" if outcome == "run" else " cancelled"))
        return taken

    def submit(tag: str, n: int, tenant: str = "") -> str:
        submission = client.submit_batch(lines(tag, n), batch_id=f"{tag}-batch", record_fields={"tenant": tenant} if tenant else None)
        for line, job_id in enumerate(r.lrange(keys.batch_jobs(submission.batch_id), 0, -1), 1):
            names[job_id] = f"{tag}{line}"
        return submission.batch_id

    yield client, r, take, submit
    client.close()


def test_a_batch_behind_a_big_one_is_served_in_turn_and_the_queue_stays_short(queue):
    client, r, take, submit = queue
    submit("A", 40)
    assert r.llen(keys.QUEUE_BULK) == READY, "the first jobs go on the queue, the others wait in their batch's line"
    submit("B", 5)
    assert r.llen(keys.QUEUE_BULK) == READY
    waiting = fairness.waiting_jobs(r, keys.QUEUE_BULK)
    assert waiting.count == 45
    first_a = r.lindex(keys.batch_jobs("A-batch"), 0)
    assert waiting.oldest_created_at == float(r.hget(keys.job(first_a), "created_at")), "the oldest waits on the queue"
    order = take(16)
    assert order[:READY] == ["A1", "A2", "A3", "A4"], "what was on the queue goes first"
    assert order[READY:] == ["A5", "B1", "A6", "B2", "A7", "B3", "A8", "B4", "A9", "B5", "A10", "A11"], "then the two lines in turn"
    assert r.llen(keys.QUEUE_BULK) == READY
    assert fairness.waiting_jobs(r, keys.QUEUE_BULK).count == 45 - 16
    # Every job on the queue is numbered there, in the order it went on: the sweeper's rule (a waiting job
    # numbered below a started one was lost) holds for jobs that waited in a line.
    on_queue = [json.loads(m)["headers"]["id"] for m in r.lrange(keys.QUEUE_BULK, 0, -1)][::-1]
    seqs = [int(r.hget(keys.job(job_id), "seq")) for job_id in on_queue]
    assert seqs == sorted(seqs) and min(seqs) > int(r.get(keys.queue_taken(keys.QUEUE_BULK)))
    assert r.zcard(keys.queue_waiting(keys.QUEUE_BULK)) == READY, "jobs still in a line are not on the queue's waiting set"


def test_tenants_share_in_turn_before_their_batches_do(queue):
    _, r, take, submit = queue
    submit("X", 30, tenant="big")
    submit("Y", 30, tenant="big")
    submit("Z", 30, tenant="small")
    order = take(READY + 12)[READY:]
    tags = [name[0] for name in order]
    assert tags.count("Z") == 6, f"the small tenant's one batch gets half of the turns: {order}"
    assert tags.count("X") == 3 and tags.count("Y") == 3, f"the big tenant's two batches share its half: {order}"


def test_a_cancelled_batch_leaves_its_line_and_a_cancelled_job_is_skipped(queue):
    client, r, take, submit = queue
    submit("A", 20)
    submit("B", 20)
    cancelled = client.cancel_batch("A-batch")
    assert cancelled.cancelled == 20, "every job of it was queued: on the queue or in its line"
    assert not r.exists(keys.fair_line(keys.QUEUE_BULK, "", "A-batch")), "the cancelled batch's line is gone"
    b_ids = r.lrange(keys.batch_jobs("B-batch"), 0, -1)
    client.cancel(b_ids[2])  # B3, waiting in its line
    r.delete(keys.job(b_ids[4]))  # B5's record expired while it waited: nobody is served by running it
    order = take(100)
    assert [name for name in order if name.startswith("B")] == [f"B{i}" for i in range(1, 21) if i not in (3, 5)]
    assert not r.exists(keys.job(b_ids[4])), "no record was made for it"
    assert [name for name in order if name.startswith("A")] == [f"A{i} cancelled" for i in range(1, 5)], "only what was on the queue already"
    assert fairness.waiting_jobs(r, keys.QUEUE_BULK).count == 0
    assert not r.exists(keys.fair_tenants(keys.QUEUE_BULK)), "no line left"


def test_the_sweepers_feed_refills_a_queue_nothing_else_fed(queue):
    client, r, take, submit = queue
    submit("A", 10)
    r.delete(keys.QUEUE_BULK)  # (as if its messages went elsewhere)
    assert fairness.feed(r, keys.QUEUE_BULK, READY) == READY
    assert take(100) == [f"A{i}" for i in range(5, 11)]
    assert fairness.feed(r, keys.QUEUE_BULK, READY) == 0


def test_interactive_jobs_never_wait_in_a_line(queue):
    client, r, _, submit = queue
    submit("A", 20)
    job_id = client.submit({"prompt": "now", **QUICK})
    assert r.llen(keys.QUEUE_INTERACTIVE) == 1 and r.hget(keys.job(job_id), "k_fair") is None


@pytest.mark.slow
def test_a_small_batch_behind_a_big_one_finishes_long_before_it_on_a_real_worker(new_database, start_worker, bloom_config):
    url = new_database()
    env = {"BELLE_BULK_READY_JOBS": "4", "BELLE_WORKER_CONCURRENCY": "8", "BELLE_BATCH_MAX_SIZE": "4"}
    start_worker(bloom_config, name="fair@tests", redis_url=url, env=env)
    with JobClient(Settings(redis_url=url, bulk_ready_jobs=4)) as client:
        big = client.submit_batch(lines("big", 200), batch_id="big")
        wait_for(lambda: client.batch_status("big").done >= 1, 120, "the big batch has started")
        # The worker holds 8 jobs and decodes 4: the batch counts the others held, not running.
        wait_for(lambda: (s := client.batch_status("big")).held >= 1 and 1 <= s.running <= 4, 120, "jobs held beside running ones", poll=0.01)
        small = client.submit_batch(lines("small", 10), batch_id="small")
        wait_for(lambda: client.batch_status(small.batch_id).done == 10, 300, "the small batch has finished")
        big_done = client.batch_status(big.batch_id).done
        # First in, first out it would finish after all 200; served in turn, after about as many of the big one's
        # jobs as its own, plus what the queue and the worker held when it came (4 + 8).
        assert big_done <= 100, f"the big batch had done {big_done} of 200 when the small one finished"
        assert client.batch_status(small.batch_id).succeeded == 10
        cancelled = client.cancel_batch(big.batch_id)
        assert cancelled.requested <= 4 and cancelled.requested + cancelled.requested_held <= 8, cancelled
        wait_for(lambda: client.batch_status(big.batch_id).finished, 120, "the big batch has ended")
        ended = client.batch_status(big.batch_id)
        assert (ended.held, ended.running, ended.queued) == (0, 0, 0) and ended.done == 200
        assert fairness.waiting_jobs(client.redis, keys.QUEUE_BULK).count == 0


def test_a_job_started_before_held_was_counted_still_ends_its_batch(queue):
    """A record a worker started before the 'generating' field was kept (no such field) is counted running."""
    client, r, take, submit = queue
    submit("A", 2)
    job_ids = r.lrange(keys.batch_jobs("A-batch"), 0, -1)
    take(2)
    for job_id in job_ids:  # as the earlier START left them: running, counted running
        r.hdel(keys.job(job_id), "generating")
    r.hset(keys.batch("A-batch"), mapping={"held": 0, "running": 2})
    store = WorkerJobStore(r, result_ttl_s=60, pending_ttl_s=600)
    store.generating([job_ids[0]], holder="w")  # the new worker begins one: it was counted running already
    for job_id in job_ids:
        store.fail(job_id, JobError(code=ErrorCode.GENERATION_ERROR, message="x"))
    status = client.batch_status("A-batch")
    assert (status.held, status.running, status.failed) == (0, 0, 2)
    assert r.hget(keys.batch("A-batch"), "completed_at") is not None
