"""Overnight batches: JSONL files end to end through a real worker, bad files, cancellation, priority
of interactive jobs over a bulk backlog, deadlines, and resubmission after a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer import fairness, keys
from producer.batches import openai_request, parse_line
from producer.client import JobClient
from producer.errors import InvalidRequestError
from producer.records import JobState
from producer.settings import Settings
from tests.test_cli import cli
from tests.waiting import wait_for

QUICK = {"num_beams": 1, "max_new_tokens": 2, "min_new_tokens": 2}


def write_lines(path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n" for line in lines), encoding="utf-8")
    return str(path)


def wait_finished(client: JobClient, batch_id: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not (status := client.batch_status(batch_id)).finished:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    return status


@pytest.fixture(scope="module")
def batch_worker(new_database, start_worker, bloom_config):
    url = new_database()
    start_worker(bloom_config, name="batch@tests", redis_url=url)
    with JobClient(Settings(redis_url=url)) as client:
        yield url, client


def test_openai_batch_lines_map_to_requests_and_what_cannot_map_is_refused():
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-x", "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "你好"}]}],
                     "max_tokens": 50, "temperature": 0.7, "top_p": 0.9, "n": 2, "stop": ["\n"], "seed": 4, "logprobs": True}}
    custom_id, fields = parse_line(line, 1, {"repetition_penalty": 1.1}, {})
    assert custom_id == "r1"
    assert fields == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "num_beams": 1, "repetition_penalty": 1.1, "max_new_tokens": 50,
                      "num_return_sequences": 2, "stop": ["\n"], "seed": 4, "output_scores": True,
                      "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}]}
    greedy = openai_request({"method": "POST", "url": "/v1/completions", "body": {"prompt": "hi", "temperature": 0}})
    assert greedy == {"prompt": "hi", "do_sample": False, "num_beams": 1}
    nulls = openai_request({"method": "POST", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": None, "temperature": None, "logit_bias": None}})
    assert nulls == {"prompt": "hi"}, "null is OpenAI's 'the default', as if the field were absent"
    for body, message in [({"prompt": "x", "logit_bias": {}}, "body.logit_bias is not supported here"),
                          ({"prompt": "x", "frequency_penalty": 0.5}, "repetition_penalty is the nearest"),
                          ({"prompt": ["a", "b"]}, "one prompt per job"), ({"messages": []}, "does not go with /v1/completions"),
                          ({"prompt": "x", "stream": True}, "body.stream is not supported here"),
                          ({"prompt": "x", "max_tokens": 5, "max_completion_tokens": 6}, "both max_tokens and max_completion_tokens are set; keep one"),
                          ({"prompt": "x", "top_k": 5, "repetition_penalty": 1.3}, None)]:
        if message is None:  # belle-queue's own parameters pass under their own names
            assert openai_request({"method": "POST", "url": "/v1/completions", "body": body}) == body
            continue
        with pytest.raises(InvalidRequestError, match=message):
            openai_request({"method": "POST", "url": "/v1/completions", "body": body})
    with pytest.raises(InvalidRequestError, match="url must be one of"):
        openai_request({"method": "POST", "url": "/v1/embeddings", "body": {}})


def test_a_2000_line_file_runs_end_to_end_and_its_results_come_back_in_input_order(batch_worker, tmp_path):
    url, client = batch_worker
    lines = [{"custom_id": f"req-{i:04d}", "prompt": f"问题 {i}", **QUICK} for i in range(2000)]
    path = write_lines(tmp_path / "big.jsonl", lines)
    submitted = cli(url, "batch", "submit", path, "--json")
    assert submitted.returncode == 0, submitted.stderr
    info = json.loads(submitted.stdout)
    assert (info["total"], info["created"], info["refused"]) == (2000, 2000, 0)
    status = wait_finished(client, info["batch_id"])
    assert (status.total, status.succeeded, status.queued, status.running, status.failed) == (2000, 2000, 0, 0, 0)
    out = tmp_path / "out.jsonl"
    results = cli(url, "batch", "results", info["batch_id"], "-o", str(out))
    assert results.returncode == 0 and "every job has ended" in results.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["custom_id"] for r in rows] == [line["custom_id"] for line in lines]
    assert [r["line"] for r in rows] == list(range(1, 2001))
    assert all(r["state"] == "succeeded" and len(r["result"]["sequences"][0]["token_ids"]) == 2 for r in rows), [r for r in rows if "result" not in r][:2]
    shown = cli(url, "batch", "status", info["batch_id"])
    assert shown.returncode == 0 and "2000/2000 done" in shown.stdout and "succeeded 2000" in shown.stdout


def test_a_file_with_bad_lines_is_refused_whole_or_its_good_lines_run_with_skip_invalid(batch_worker, tmp_path):
    url, client = batch_worker
    lines = [{"custom_id": "a", "prompt": "好", **QUICK}, {"custom_id": "b", "prompt": "x", "temperature": 5},
             {"custom_id": "c", "prompt": "ok", **QUICK}, "{not json", {"custom_id": "a", "prompt": "dup", **QUICK},
             {"custom_id": "d", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    queued_before = client.redis.llen(keys.QUEUE_BULK)
    refused = cli(url, "batch", "submit", path)
    assert refused.returncode == 2
    for expected in ("3 of 6 lines are invalid, nothing was submitted", "line 2 (b): temperature must be in [0.1, 2.0], got 5",
                     "line 4: not JSON", "line 5 (a): custom_id 'a' is also on line 1"):
        assert expected in refused.stderr, refused.stderr
    assert client.redis.llen(keys.QUEUE_BULK) == queued_before
    skipped = cli(url, "batch", "submit", path, "--skip-invalid", "--refusals", str(tmp_path / "refused.jsonl"), "--json")
    assert skipped.returncode == 0, skipped.stderr
    batch_id = json.loads(skipped.stdout)["batch_id"]
    errors = [json.loads(line) for line in (tmp_path / "refused.jsonl").read_text().splitlines()]
    assert [(e["line"], e["custom_id"]) for e in errors] == [(2, "b"), (4, None), (5, "a")]
    wait_finished(client, batch_id)
    results = list(client.iter_batch_results(batch_id))
    assert [(r.line, r.custom_id, r.state) for r in results] == [(1, "a", JobState.SUCCEEDED), (3, "c", JobState.SUCCEEDED), (6, "d", JobState.SUCCEEDED)]
    assert client.batch_status(batch_id).refused == 3


def test_cancelling_a_batch_midway_cancels_the_rest_and_keeps_what_finished(batch_worker, tmp_path):
    url, client = batch_worker
    submission = client.submit_batch([{"custom_id": f"c{i}", "prompt": f"question {i}", "num_beams": 1, "max_new_tokens": 60, "min_new_tokens": 60}
                                      for i in range(400)], new=True)
    deadline = time.monotonic() + 120
    while client.batch_status(submission.batch_id).succeeded < 20:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelled = cli(url, "batch", "cancel", submission.batch_id, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    outcomes = json.loads(cancelled.stdout)
    assert outcomes.get("cancelled", 0) > 100
    status = wait_finished(client, submission.batch_id, 120)
    assert status.state == "cancelled" and status.succeeded >= 20 and status.cancelled >= outcomes["cancelled"]
    assert status.succeeded + status.cancelled + status.failed == 400 and status.failed == 0
    results = list(client.iter_batch_results(submission.batch_id))
    assert [r.custom_id for r in results] == [f"c{i}" for i in range(400)]
    finished = [r for r in results if r.state is JobState.SUCCEEDED]
    assert len(finished) == status.succeeded and all(len(r.result.sequences[0].token_ids) == 60 for r in finished)


def test_an_interactive_job_starts_within_a_batch_cycle_behind_a_10000_job_backlog(new_database, start_worker, bloom_config):
    url = new_database()
    with JobClient(Settings(redis_url=url)) as client:
        backlog = client.submit_batch([{"custom_id": f"b{i}", "prompt": f"bulk {i}", "num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 4}
                                       for i in range(10_000)])
        assert client.batch_status(backlog.batch_id).queued == 10_000
        worker = start_worker(bloom_config, name="backlog@tests", redis_url=url)
        deadline = time.monotonic() + 120
        while client.batch_status(backlog.batch_id).succeeded < 200:  # the worker is deep in the backlog
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.time()
        record = client.wait(client.submit({"prompt": "an interactive question", **QUICK}), 60)
        waited = record.started_at - started
        remaining = client.batch_status(backlog.batch_id)
        cycle = next((line for line in worker.log.splitlines() if "decoding:" in line), "-")
        client.cancel_batch(backlog.batch_id)
        worker.stop()
    assert record.state is JobState.SUCCEEDED
    assert remaining.queued > 5_000, "it went ahead of the backlog"
    assert waited < 2.0, f"started {waited:.2f} s after submission (a batch cycle here: {cycle})"


def test_jobs_not_started_by_their_deadline_end_expired_without_running(new_database, start_worker, bloom_config, tmp_path):
    url = new_database()
    with JobClient(Settings(redis_url=url)) as client:
        single = client.submit({"prompt": "too late", "deadline": time.time() + 1, **QUICK})
        path = write_lines(tmp_path / "window.jsonl", [{"prompt": f"q{i}", **QUICK} for i in range(5)])
        submitted = cli(url, "batch", "submit", path, "--completion-window", "1s", "--json")
        batch_id = json.loads(submitted.stdout)["batch_id"]
        on_time = client.submit({"prompt": "in time", "deadline": time.time() + 600, **QUICK})
        passed = max(client.get(single).request["deadline"], client.batch_status(batch_id).deadline)
        wait_for(lambda: time.time() > passed, 30, "the deadlines passed in the queue (no worker yet)")
        worker = start_worker(bloom_config, name="deadline@tests", redis_url=url)
        expired = client.wait(single, 60)
        assert expired.state is JobState.EXPIRED and expired.error.code == "expired" and expired.result is None
        assert "deadline" in expired.error.message and expired.error.parameter == "deadline"
        status = wait_finished(client, batch_id, 60)
        assert (status.expired, status.succeeded) == (5, 0)
        assert client.wait(on_time, 60).state is JobState.SUCCEEDED
        assert "generation" not in json.dumps(expired.model_dump(mode="json"))
    assert worker.alive()


def test_a_batch_resubmitted_after_the_submitter_crashed_enqueues_every_line_once(new_database, tmp_path):
    url = new_database()
    lines = [{"custom_id": f"k{i}", "prompt": f"resume {i}", **QUICK} for i in range(20_000)]
    path = write_lines(tmp_path / "crash.jsonl", lines)
    command = [sys.executable, "-m", "producer.cli", "--redis-url", url, "batch", "submit", path, "--batch-id", "overnight-17", "--json"]
    crashed = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    batch_key = keys.batch("overnight-17")
    with JobClient(Settings(redis_url=url)) as client:
        deadline = time.monotonic() + 120
        while int(client.redis.hget(batch_key, "queued") or 0) < 1_000:
            assert time.monotonic() < deadline and crashed.poll() is None, "the submitter ended before it could be killed"
            time.sleep(0.001)
        os.kill(crashed.pid, signal.SIGKILL)
        crashed.communicate()
        partial = int(client.redis.hget(batch_key, "queued"))
        assert 1_000 <= partial < 20_000, partial
        again = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        info = json.loads(again.stdout)
        assert keys.batch(info["batch_id"]) == batch_key and info["total"] == 20_000 and info["created"] == 20_000 - partial
        assert "were already in: batch resumed" in again.stderr
        assert fairness.waiting_jobs(client.redis, keys.QUEUE_BULK).count == 20_000 and client.redis.llen(keys.batch_jobs(info["batch_id"])) == 20_000
        assert client.redis.llen(keys.QUEUE_BULK) == client.settings.bulk_ready_jobs, "the rest wait in the batch's fair-share line"
        assert client.batch_status(info["batch_id"]).queued == 20_000
        assert [r.custom_id for r in client.iter_batch_results(info["batch_id"])] == [line["custom_id"] for line in lines]


def test_a_batch_cancelled_while_it_is_being_submitted_leaves_no_job_to_run(new_database, tmp_path):
    url = new_database()
    path = write_lines(tmp_path / "cancel-me.jsonl", [{"custom_id": f"c{i}", "prompt": f"cancel {i}", **QUICK} for i in range(20_000)])
    command = [sys.executable, "-m", "producer.cli", "--redis-url", url, "batch", "submit", path, "--batch-id", "cancel-race", "--json"]
    submitter = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with JobClient(Settings(redis_url=url)) as client:
        deadline = time.monotonic() + 120
        while int(client.redis.hget(keys.batch("cancel-race"), "queued") or 0) < 1_000:
            assert time.monotonic() < deadline and submitter.poll() is None, "the submitter ended before the cancel"
            time.sleep(0.001)
        client.cancel_batch("cancel-race")
        _, stderr = submitter.communicate(timeout=120)
        assert submitter.returncode != 0 and "was cancelled while it was being submitted" in stderr, stderr
        job_ids = client.redis.lrange(keys.batch_jobs("cancel-race"), 0, -1)
        assert 1_000 <= len(job_ids) < 20_000
        states = [client.get(job_id).state for job_id in job_ids]
        assert set(states) == {JobState.CANCELLED}, "a job enqueued after the cancel walked the list was cancelled too"
        status = client.batch_status("cancel-race")
        assert status.cancelled == len(job_ids) and status.queued == 0 and status.finished


def test_a_submitted_batch_is_never_enqueued_again_and_its_id_refuses_other_lines(new_database, tmp_path):
    url = new_database()
    lines = [{"custom_id": f"o{i}", "prompt": f"once {i}", **QUICK} for i in range(50)]
    path = write_lines(tmp_path / "once.jsonl", lines)
    with JobClient(Settings(redis_url=url)) as client:
        with pytest.raises(TypeError, match="not a str"):
            client.submit_batch(path)
        first = client.submit_batch(Path(path), batch_id="nightly")
        assert first.created == 50 and client.redis.llen(keys.QUEUE_BULK) == 50
        for job_id in client.redis.lrange(keys.batch_jobs("nightly"), 0, -1):
            client.redis.delete(keys.job(job_id))  # as when the results have expired
        again = cli(url, "batch", "submit", path, "--batch-id", "nightly", "--json")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["created"] == 0 and "all were already in: nothing enqueued" in again.stderr
        assert client.redis.llen(keys.QUEUE_BULK) == 50, "the expired records did not make the lines run again"
        longer = write_lines(tmp_path / "longer.jsonl", [*lines, {"custom_id": "o50", "prompt": "one more", **QUICK}])
        refused = cli(url, "batch", "submit", longer, "--batch-id", "nightly")
        assert refused.returncode != 0 and "batch nightly was submitted from other lines or settings; use --new" in refused.stderr
        assert client.redis.llen(keys.QUEUE_BULK) == 50
