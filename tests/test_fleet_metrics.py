"""The fleet metrics (producer/fleet_metrics.py), read from a real Redis at scrape time: through the collector,
the standalone `belle-queue exporter`, and the gateway's /metrics; the jobs ended as the final-state scripts
count them, with a real worker; and a worker's own metrics endpoint on its bind address."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from producer import keys
from producer.client import JobClient
from producer.connection import redis_client
from producer.embedded_redis import free_port
from producer.enqueue import new_job_id, task_message
from producer.errors import ErrorCode
from producer.fleet_metrics import fleet_registry
from producer.records import JobState
from producer.settings import Settings
from tests.waiting import wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
QUICK = {"prompt": "hi", "num_beams": 1, "max_new_tokens": 3}


def parse(text: str) -> Samples:
    """(sample name, sorted labels) → value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def fleet(url: str, *, batch_series: int = 20) -> Samples:
    client = redis_client(url)
    try:
        return parse(generate_latest(fleet_registry(client, batch_series=batch_series)).decode())
    finally:
        client.close()


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def fleet_names(samples: Samples) -> set[str]:
    return {name for name, _ in samples if name.startswith("belle_fleet_")}


def test_queue_depth_and_the_oldest_wait_per_queue_then_the_cancelled_jobs_counted(new_database):
    url = new_database()  # no worker serves it: the jobs wait
    with JobClient(Settings(redis_url=url)) as client:
        submitted_from = time.time()
        interactive = [client.submit(QUICK) for _ in range(2)]
        for _ in range(3):
            client.submit(QUICK, queue=keys.QUEUE_BULK)
        samples = fleet(url)
        read_by = time.time()
        assert value(samples, "belle_fleet_up") == 1
        assert value(samples, "belle_fleet_queue_waiting_jobs", queue="interactive") == 2
        assert value(samples, "belle_fleet_queue_waiting_jobs", queue="bulk") == 3
        oldest = value(samples, "belle_fleet_queue_oldest_waiting_seconds", queue="interactive")
        assert 0 <= oldest <= read_by - submitted_from
        assert value(samples, "belle_fleet_live_workers") == 0
        assert not [key for key in samples if key[0] == "belle_fleet_jobs_ended_total"], "no job has ended yet"

        for job_id in interactive:
            assert client.cancel(job_id).outcome == "cancelled"
        assert client.cancel(interactive[0]).outcome.startswith("final"), "a second cancel changes nothing, and is not counted"
        samples = fleet(url)
    assert value(samples, "belle_fleet_queue_waiting_jobs", queue="interactive") == 0
    assert value(samples, "belle_fleet_queue_oldest_waiting_seconds", queue="interactive") == 0
    assert value(samples, "belle_fleet_queue_waiting_jobs", queue="bulk") == 3
    assert value(samples, "belle_fleet_jobs_ended_total", state="cancelled", error=ErrorCode.CANCELLED.value) == 2


def test_open_batches_show_their_progress_and_leave_once_completed(new_database):
    url = new_database()
    with JobClient(Settings(redis_url=url)) as client:
        older = client.submit_batch([dict(QUICK, prompt=f"old {i}") for i in range(4)]).batch_id
        newer = client.submit_batch([dict(QUICK, prompt=f"new {i}") for i in range(2)]).batch_id
        samples = fleet(url, batch_series=1)
        assert value(samples, "belle_fleet_open_batches") == 2
        assert value(samples, "belle_fleet_open_batch_jobs", progress="total") == 6
        assert value(samples, "belle_fleet_open_batch_jobs", progress="done") == 0
        assert value(samples, "belle_fleet_batch_jobs", batch_id=newer, progress="total") == 2, "the newest batch is shown by itself"
        assert value(samples, "belle_fleet_batch_jobs", batch_id=older, progress="total") is None, "beyond BELLE_FLEET_BATCH_SERIES: totals only"

        first_job = next(iter(client.iter_batch_results(older))).job_id
        client.cancel(first_job)
        samples = fleet(url)
        assert value(samples, "belle_fleet_batch_jobs", batch_id=older, progress="done") == 1
        assert value(samples, "belle_fleet_batch_jobs", batch_id=older, progress="total") == 4
        assert value(samples, "belle_fleet_open_batch_jobs", progress="done") == 1

        client.cancel_batch(older)
        samples = fleet(url)
        assert value(samples, "belle_fleet_open_batches") == 1, "a batch whose jobs have all ended is no longer open"
        assert value(samples, "belle_fleet_batch_jobs", batch_id=older, progress="total") is None
        assert client.redis.zrange(keys.OPEN_BATCHES, 0, -1) == [keys.batch(newer)]
        assert value(samples, "belle_fleet_jobs_ended_total", state="cancelled", error="cancelled") == 4


def test_when_redis_cannot_be_read_the_scrape_says_so_and_shows_nothing_else():
    samples = fleet(f"redis://127.0.0.1:{free_port()}/0")
    assert value(samples, "belle_fleet_up") == 0
    assert fleet_names(samples) == {"belle_fleet_up"}


def start_exporter(url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "producer.cli", "--redis-url", url, "exporter", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{port}/metrics"

    def answers():
        if process.poll() is not None:
            raise AssertionError(f"the exporter exited with {process.returncode}: {process.stdout.read()}")
        try:
            return urllib.request.urlopen(address, timeout=5).read().decode()
        except OSError:
            return None

    wait_for(answers, 30, "the exporter answers")
    return process, address


def stop(process: subprocess.Popen) -> int:
    process.terminate()
    try:
        return process.wait(30)
    finally:
        process.stdout.close()


def test_the_exporter_command_serves_the_fleet_metrics_and_stops_on_sigterm(new_database):
    url = new_database()
    with JobClient(Settings(redis_url=url)) as client:
        client.submit(QUICK, queue=keys.QUEUE_BULK)
    process, address = start_exporter(url)
    try:
        samples = parse(urllib.request.urlopen(address, timeout=10).read().decode())
        assert value(samples, "belle_fleet_up") == 1
        assert value(samples, "belle_fleet_queue_waiting_jobs", queue="bulk") == 1
        with JobClient(Settings(redis_url=url)) as client:
            client.submit(QUICK, queue=keys.QUEUE_BULK)
        samples = parse(urllib.request.urlopen(address, timeout=10).read().decode())
        assert value(samples, "belle_fleet_queue_waiting_jobs", queue="bulk") == 2, "read at each scrape"
    finally:
        assert stop(process) == 0


def test_the_exporter_without_prometheus_client_says_what_to_install():
    code = ("import sys; sys.modules['prometheus_client'] = None; from producer.cli import main; "
            "sys.exit(main(['--redis-url', 'redis://127.0.0.1:1/0', 'exporter']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "pip install 'belle-queue[gateway]'" in done.stderr and "prometheus-client" in done.stderr


def test_the_gateway_serves_the_fleet_metrics_beside_its_own(new_database, start_gateway):
    url = new_database()
    gateway = start_gateway(url)
    with JobClient(Settings(redis_url=url)) as client:
        client.submit(QUICK)
        client.submit(QUICK)
    samples = parse(httpx.get(gateway.url + "/metrics", timeout=30).text)
    assert value(samples, "belle_fleet_up") == 1
    assert value(samples, "belle_fleet_queue_waiting_jobs", queue="interactive") == 2
    assert any(name == "belle_gateway_requests_total" for name, _ in samples), "the gateway's own metrics are still there"


@pytest.mark.slow
def test_jobs_ended_by_state_and_error_across_the_fleet_and_the_workers_metrics_bind(new_database, start_worker, bloom_config):
    """A real worker ends jobs through finish.lua and fail_if_absent.lua: each ended job is counted once, by its
    final state and error code. Its own metrics listen where BELLE_METRICS_HOST says (127.0.0.2 here: a loopback
    address that 127.0.0.1 does not reach)."""
    url = new_database()
    port = free_port()
    start_worker(bloom_config, name="fleet@tests", redis_url=url, env={"BELLE_METRICS_PORT": str(port), "BELLE_METRICS_HOST": "127.0.0.2"})
    with JobClient(Settings(redis_url=url)) as client:
        done = [client.wait(client.submit(dict(QUICK, prompt=f"hi {i}", min_new_tokens=3)), 60) for i in range(2)]
        failed = client.wait(client.submit(dict(QUICK, adapter="nobody")), 60)
        unreadable = new_job_id()
        message = json.loads(task_message(unreadable, QUICK, keys.QUEUE_INTERACTIVE))
        message["content-type"] = "application/x-python-serialize"  # (pickle: refused unread, its job failed)
        client.redis.lpush(keys.QUEUE_INTERACTIVE, json.dumps(message))
        refused = wait_for(lambda: (r := client.store.get(unreadable)) is not None and r.state.is_final and r, 60, "the refused message's job has ended")
    assert [r.state for r in done] == [JobState.SUCCEEDED] * 2 and failed.state is JobState.FAILED
    assert refused.state is JobState.FAILED and refused.error.code is ErrorCode.INVALID_REQUEST
    samples = fleet(url)
    ended = {labels: count for (name, labels), count in samples.items() if name == "belle_fleet_jobs_ended_total"}
    assert ended == {(("error", ""), ("state", "succeeded")): 2, (("error", "invalid_request"), ("state", "failed")): 2}
    assert value(samples, "belle_fleet_live_workers") == 1 and value(samples, "belle_fleet_workers_refusing_writes") == 0
    assert value(samples, "belle_fleet_queue_waiting_jobs", queue="interactive") == 0

    own = parse(urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10).read().decode())
    assert value(own, "belle_time_between_tokens_seconds_count") == 2, "one observation per job of 3 tokens (the failed ones made none)"
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
