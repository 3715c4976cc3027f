"""Operating workers: hardware profiles, announcements, the supervisor, warm shutdown, metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from producer.client import JobClient
from producer.embedded_redis import free_port
from producer.errors import ErrorCode, InvalidRequestError
from producer.records import JobState
from producer.schemas import parse_request
from producer.settings import Settings
from producer.fleet import WorkerInfo, check_against_workers
from tests.test_cli import cli
from tests.waiting import wait_for
from worker.ops.commands import _settings
from worker.model.hardware import load_profile
from worker.ops.supervisor import node_name


def test_profiles_come_from_the_seed_table_and_set_batch_budgets_unless_set_explicitly(monkeypatch):
    settings = Settings()
    caps = {name: (p.max_new_tokens, p.num_beams) for name in ("1080ti", "3090", "a100-40g", "a100-80g", "h100-80g")
            for p in [load_profile(name, settings)]}
    assert caps["1080ti"] == (256, 2) and caps["3090"] == (512, 4) and caps["a100-40g"] == (1024, 8)
    with pytest.raises(FileNotFoundError, match="1080ti, 3090, a100-40g, a100-80g, h100-80g"):
        load_profile("tpu", settings)
    from producer.settings import get_settings

    args = type("Args", (), {"redis_url": None})()
    get_settings.cache_clear()
    applied = _settings(args, hardware_profile="3090")
    assert (applied.batch_max_size, applied.batch_max_tokens) == (32, 16384)
    monkeypatch.setenv("BELLE_BATCH_MAX_SIZE", "8")
    get_settings.cache_clear()
    try:
        applied = _settings(args, hardware_profile="3090")
        assert (applied.batch_max_size, applied.batch_max_tokens) == (8, 16384), "the environment wins over the profile"
    finally:
        get_settings.cache_clear()


@pytest.fixture(scope="module")
def profiled_worker(new_database, start_worker, bloom_config):
    url = new_database()
    worker = start_worker(bloom_config, name="profiled@tests", redis_url=url, env={"BELLE_HARDWARE_PROFILE": "1080ti"})
    with JobClient(Settings(redis_url=url)) as client:
        yield worker, client


def test_a_job_over_the_profiles_caps_is_refused_naming_the_cap_and_the_profile(profiled_worker):
    worker, client = profiled_worker
    ok = client.wait(client.submit({"prompt": "hi", "num_beams": 2, "max_new_tokens": 8}), 60)
    assert ok.state is JobState.SUCCEEDED
    too_long = client.wait(client.submit({"prompt": "hi", "num_beams": 1, "max_new_tokens": 300}), 60)
    assert too_long.state is JobState.FAILED and too_long.error.code is ErrorCode.INVALID_REQUEST and too_long.error.parameter == "max_new_tokens"
    assert "max_new_tokens must be in [1, 256] on this worker (hardware profile 1080ti" in too_long.error.message
    too_wide = client.wait(client.submit({"prompt": "hi", "num_beams": 4, "max_new_tokens": 8}), 60)
    assert too_wide.error.parameter == "num_beams" and "[1, 2]" in too_wide.error.message
    assert "batches of ≤16 jobs, ≤8192 tokens" in worker.log


def test_on_a_1080ti_worker_a_plain_stream_runs_with_one_beam_and_a_plain_submit_is_refused_naming_the_default_and_the_fix(profiled_worker):
    worker, client = profiled_worker
    streamed = cli(worker.redis_url, "submit", "--prompt", "hi", "--stream", "--set", "max_new_tokens=6", "--set", "min_new_tokens=6")
    assert streamed.returncode == 0, streamed.stderr
    record = client.get(streamed.stderr.split()[0])  # (the job id, on stderr)
    assert record.state is JobState.SUCCEEDED and record.request["num_beams"] == 1 and record.request["stream"] is True
    plain = cli(worker.redis_url, "submit", "--prompt", "hi", "--set", "max_new_tokens=6", "--wait", "60")
    assert plain.returncode == 1 and "num_beams must be in [1, 2] on this worker (hardware profile 1080ti" in plain.stdout + plain.stderr
    assert ("got 4 (the default for a request that leaves num_beams unset); submit with num_beams=2 or less, or to a worker with a larger profile"
            in plain.stdout + plain.stderr), plain.stdout + plain.stderr


def test_workers_announce_themselves_and_the_producer_checks_jobs_against_them(profiled_worker, new_database):
    worker, client = profiled_worker
    (info,) = client.workers()
    assert (info.name, info.model, info.profile, info.max_new_tokens, info.num_beams, info.adapters, info.device) == (
        "profiled@tests", "tiny-bloom", "1080ti", 256, 2, [], "cpu")
    assert time.time() - info.heartbeat_at < 10 and info.pid == worker.process.pid
    with pytest.raises(InvalidRequestError, match=r"max_new_tokens must be in \[1, 256\] on the live workers \(profiled@tests \(1080ti\)\)"):
        client.submit({"prompt": "hi", "max_new_tokens": 512}, check_workers=True)
    with pytest.raises(InvalidRequestError, match=r"adapter must be one of the adapters live workers serve \(\[\]\), got 'poet'"):
        client.submit({"prompt": "hi", "adapter": "poet"}, check_workers=True)
    assert client.submit({"prompt": "hi", "num_beams": 2, "max_new_tokens": 4}, check_workers=True)
    listed = cli(worker.redis_url, "workers")
    assert listed.returncode == 0 and "profiled@tests: tiny-bloom on cpu; adapters: none; profile 1080ti (max_new_tokens ≤256, beams ≤2)" in listed.stdout
    refused = cli(worker.redis_url, "submit", "--prompt", "hi", "--set", "max_new_tokens=400", "--check-workers")
    assert refused.returncode == 2 and "on the live workers" in refused.stderr
    empty = cli(new_database(), "workers", "--json")
    assert empty.returncode == 0 and json.loads(empty.stdout) == []


def test_a_job_its_workers_profile_refuses_goes_back_for_a_worker_that_runs_it(profiled_worker, start_worker, bloom_config):
    worker, client = profiled_worker
    wide = start_worker(bloom_config, name="unprofiled@tests", redis_url=worker.redis_url)
    try:
        wait_for(lambda: len(client.workers()) == 2, 30, "both workers announced")
        records = [client.wait(client.submit({"prompt": f"wide {i}", "num_beams": 4, "max_new_tokens": 4}), 120) for i in range(4)]
        assert [(r.state, r.worker) for r in records] == [(JobState.SUCCEEDED, "unprofiled@tests")] * 4
        assert all(r.attempts == 1 for r in records), "going back unrun costs no attempt"
    finally:
        wide.stop()
    wait_for(lambda: [w.name for w in client.workers()] == ["profiled@tests"], 30, "the second worker gone")
    alone = client.wait(client.submit({"prompt": "wide again", "num_beams": 4, "max_new_tokens": 4}), 60)
    assert alone.state is JobState.FAILED and alone.error.parameter == "num_beams", "with no other worker it fails at once"


def test_checking_against_workers_picks_any_worker_that_can_run_the_job():
    def info(name, adapters, cap):
        return WorkerInfo(name=name, host="h", pid=1, version="0", model="m", adapters=adapters, device="cuda", profile="p", max_new_tokens=cap,
                          num_beams=4, batch_max_size=8, concurrency=16, started_at=0, heartbeat_at=0)

    workers = [info("small", ["poet"], 256), info("big", [], 2048)]
    check_against_workers(parse_request({"prompt": "x", "max_new_tokens": 1024}), workers)  # the big one can
    with pytest.raises(InvalidRequestError, match=r"\[1, 256\].*small \(p\)"):  # only the small one serves poet
        check_against_workers(parse_request({"prompt": "x", "adapter": "poet", "max_new_tokens": 1024}), workers)
    with pytest.raises(InvalidRequestError, match="num_return_sequences must be in"):
        check_against_workers(parse_request({"prompt": "x", "do_sample": True, "num_beams": 1, "num_return_sequences": 6}), workers)
    with pytest.raises(InvalidRequestError, match="no live worker"):
        check_against_workers(parse_request({"prompt": "x"}), [])


def test_node_names_per_gpu():
    assert node_name("belle@host-1", "gpu0") == "belle-gpu0@host-1" and node_name("solo", "3") == "solo-3"


@pytest.mark.slow  # starts its worker processes itself, not through the start_worker fixture
def test_the_supervisor_restarts_a_killed_worker_and_no_job_is_lost(new_database, bloom_config, tmp_path):
    url = new_database()
    fast_redelivery = {"BELLE_VISIBILITY_TIMEOUT_S": "4", "BELLE_UNACKED_RESTORE_INTERVAL_S": "1", "BELLE_UNACKED_RESTORE_THROTTLE": "1",
                       "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "supervisor.log", "w+")
    supervisor = subprocess.Popen([sys.executable, "-m", "worker", "--redis-url", url, "worker", "--model", str(bloom_config), "--device", "cpu",
                                   "--processes", "2", "--concurrency", "4", "--name", "sup@tests"], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **fast_redelivery})
    try:
        with JobClient(Settings(redis_url=url)) as client:
            deadline = time.monotonic() + 120
            while len(client.workers()) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            workers = {w.name: w for w in client.workers()}
            assert sorted(workers) == ["sup-0@tests", "sup-1@tests"]
            request = {"num_beams": 1, "max_new_tokens": 120, "min_new_tokens": 100}
            ids = [client.submit({"prompt": f"question number {i}", **request}) for i in range(12)]
            deadline = time.monotonic() + 60
            while not (running := {r.worker for j in ids if (r := client.get(j)).state is JobState.RUNNING and r.attempts}) >= set(workers):
                assert time.monotonic() < deadline, f"jobs did not start generating on both workers: {running}"
                time.sleep(0.02)
            os.kill(workers["sup-1@tests"].pid, signal.SIGKILL)
            records = [client.wait(job_id, 180) for job_id in ids]
            assert [r.state for r in records] == [JobState.SUCCEEDED] * 12
            assert any(r.attempts == 2 for r in records), "the killed worker's jobs ran again elsewhere"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                restarted = {w.name: w.pid for w in client.workers()}
                if restarted.get("sup-1@tests") not in (None, workers["sup-1@tests"].pid):
                    break
                time.sleep(0.2)
            assert restarted.get("sup-1@tests") not in (None, workers["sup-1@tests"].pid), "sup-1 came back with a new process"
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=90) == 0
        log.seek(0)
        text = log.read()
        assert "sup-1@tests exited (code -9); restarting it now" in text and "every worker has stopped" in text
        with JobClient(Settings(redis_url=url)) as client:
            assert client.workers() == [], "stopped workers withdraw their announcement"
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        log.close()


def test_a_warm_shutdown_finishes_the_decoding_jobs_and_returns_the_others(new_database, start_worker, bloom_config):
    url = new_database()
    worker = start_worker(bloom_config, name="warm@tests", redis_url=url, env={"BELLE_BATCH_MAX_SIZE": "2"})
    with JobClient(Settings(redis_url=url)) as client:
        ids = [client.submit({"prompt": f"question {i}", "num_beams": 1, "max_new_tokens": 150, "min_new_tokens": 100}) for i in range(6)]
        # Batches of 2, and interactive jobs may take a batch a quarter over (at least one): 3 decode at a time,
        # each for 100 steps or more, so the signal comes long before the last of the six could start.
        wait_for(lambda: sum(client.get(j).attempts for j in ids) >= 3 and all(client.get(j).state is JobState.RUNNING for j in ids), 60,
                 lambda: f"three jobs decode and the worker holds all six: {[(r.state, r.attempts) for r in map(client.get, ids)]}")
        decoding = {j for j in ids if client.get(j).attempts}
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(timeout=90) == 0
        records = [client.get(j) for j in ids]
        finished = [r for r in records if r.state is JobState.SUCCEEDED]
        returned = [r for r in records if r.state is JobState.QUEUED]
        # How many had started by the time the signal landed depends on the machine's speed; the rule does not:
        # whatever decodes finishes, whatever waits goes back.
        assert len(finished) + len(returned) == 6 and returned, [(r.state, r.attempts) for r in records]
        assert decoding <= {r.job_id for r in finished}, "a decoding job is finished, never returned"
        assert all(r.attempts == 0 and r.worker is None for r in returned), "a returned job's attempt is not counted"
        # The log says so in one line per returned job and one summary line, with no traceback and nothing from Celery
        # about the rejected messages.
        wait_for(lambda: "warm shutdown: returned" in worker.log, 10, lambda: f"the worker sums up the returned jobs; its log:\n{worker.log[-4000:]}")
        lines = worker.log.splitlines()
        assert "Traceback" not in worker.log and not [line for line in lines if "reject requeue" in line], worker.log[-6000:]
        for record in returned:
            said = [line for line in lines if record.job_id in line and "goes back to the queue" in line]
            assert len(said) == 1 and " INFO belle.worker: " in said[0], said
        assert f"warm shutdown: returned {len(returned)} held jobs to their queues" in worker.log
        successor = start_worker(bloom_config, name="successor@tests", redis_url=url)
        records = [client.wait(j, 120) for j in ids]
        assert all(r.state is JobState.SUCCEEDED for r in records)
        assert sorted(r.worker for r in records) == ["successor@tests"] * len(returned) + ["warm@tests"] * len(finished)
        assert successor.alive()


def test_the_worker_serves_prometheus_metrics(new_database, start_worker, bloom_config):
    url = new_database()
    port = free_port()
    start_worker(bloom_config, name="metrics@tests", redis_url=url, env={"BELLE_METRICS_PORT": str(port)})
    with JobClient(Settings(redis_url=url)) as client:
        done = [client.wait(client.submit({"prompt": f"hi {i}", "num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 6}), 60) for i in range(3)]
        failed = client.wait(client.submit({"prompt": "hi", "adapter": "nobody"}), 60)
    assert all(r.state is JobState.SUCCEEDED for r in done) and failed.state is JobState.FAILED

    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}

    # (the worker counts a job just after writing its final record, which the client may see first)
    values = wait_for(lambda: (v := scrape()).get('belle_hop_seconds_count{hop="record"}') == 3 and 'belle_jobs_total{error="invalid_request",state="failed"}' in v and v,
                      10, "the worker has counted the four jobs")
    assert values['belle_jobs_total{error="",state="succeeded"}'] == 3
    assert values['belle_jobs_total{error="invalid_request",state="failed"}'] == 1
    assert values["belle_generated_tokens_total"] == 18
    assert values["belle_decoding_steps_total"] >= 6
    assert all(values[f'belle_hop_seconds_count{{hop="{hop}"}}'] == 3 for hop in ("queued", "admission", "first_token", "generation", "record"))
    assert values["belle_time_to_first_token_seconds_count"] == 3 and values["belle_time_to_first_token_seconds_sum"] > 0
    # (each job decoded 6 tokens: one observation each, of its 5 gaps after the first token)
    assert values["belle_time_between_tokens_seconds_count"] == 3 and 0 < values["belle_time_between_tokens_seconds_sum"] < 60


def test_a_job_released_by_a_stopping_worker_is_queued_again_without_counting_the_attempt(new_database):
    from producer.connection import redis_client
    from producer.store import canonical_json
    from worker.serving.job_writes import WorkerJobStore

    url = new_database()
    with JobClient(Settings(redis_url=url)) as client:  # (no worker serves this database: the job stays queued)
        job = client.submit({"prompt": "x"})
        canonical = canonical_json(client.get(job).request)  # as its message holds it
    store = WorkerJobStore(redis_client(url), result_ttl_s=60, pending_ttl_s=60)
    assert store.start(job, worker="w1", request_json=canonical, max_attempts=3).should_run
    assert not store.release(job, holder="someone-else")
    assert store.release(job, holder="w1")
    record = store.get(job)
    assert (record.state, record.attempts, record.worker, record.started_at) == (JobState.QUEUED, 0, None, None)
    assert not store.release(job, holder="w1"), "only a running job is released"


def test_task_events_flow_for_flower(new_database, start_worker, bloom_config):
    """Flower reads Celery's event stream: with BELLE_TASK_EVENTS the worker sends an event as it receives,
    starts and ends each job. (The producer writes its messages itself and sends no task-sent event.)"""
    from producer.queueing import make_sender

    url = new_database()
    start_worker(bloom_config, name="events@tests", redis_url=url, env={"BELLE_TASK_EVENTS": "true"})
    settings = Settings(redis_url=url, task_events=True)
    app = make_sender(settings)
    seen: list[dict] = []
    with app.connection() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": seen.append})
        listener = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True)
        listener.start()
        with app.connection() as probing, app.events.Dispatcher(probing) as probe:

            def probe_received() -> bool:
                probe.send("belle-probe")
                return any(e["type"] == "belle-probe" for e in seen)

            wait_for(probe_received, 30, "the receiver's queue is bound (an event sent now reaches it)")
        with JobClient(settings) as client:
            job_id = client.submit({"prompt": "events", "num_beams": 1, "max_new_tokens": 3})
            client.wait(job_id, 60)
        deadline = time.monotonic() + 15
        while not {"task-received", "task-started", "task-succeeded"} <= {e["type"] for e in seen if e.get("uuid") == job_id}:
            assert time.monotonic() < deadline, sorted({e["type"] for e in seen})
            time.sleep(0.1)
        receiver.should_stop = True
        listener.join(10)
        assert not listener.is_alive()
    app.close()
