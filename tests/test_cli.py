"""The `belle-queue` command: client commands, exit codes, and the light client without torch."""

from __future__ import annotations

import json
import subprocess
import sys

from producer import keys
from producer.client import JobClient
from producer.settings import Settings

# Run the CLI in a fresh interpreter where torch, transformers and the worker cannot be imported,
# as on a backend host that installed only the client.
NO_GPU_STACK = (
    "import sys\n"
    "for name in ('torch', 'transformers', 'peft', 'bitsandbytes'):\n"
    "    sys.modules[name] = None\n"
    "from producer.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "assert 'worker.model.engine' not in sys.modules and 'worker.serving.handler' not in sys.modules\n"
    "sys.exit(code)\n"
)
UNSERVED = "belle.tests.unserved"  # a queue no worker consumes: its jobs stay queued


def cli(redis_url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_GPU_STACK, "--redis-url", redis_url, *args], capture_output=True, text=True, timeout=timeout)


def test_submit_and_wait_prints_the_record_as_json(redis_server, worker):
    done = cli(redis_server.url, "submit", "--prompt", "你好", "--preset", "greedy", "--set", "max_new_tokens=5", "--wait", "60", "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["state"] == "succeeded" and len(record["result"]["sequences"][0]["token_ids"]) <= 5
    job_id = record["job_id"]

    status = cli(redis_server.url, "status", job_id)
    assert (status.returncode, status.stdout.strip()) == (0, "succeeded")
    result = cli(redis_server.url, "result", job_id)
    assert result.returncode == 0 and f"job {job_id}: succeeded" in result.stdout


def test_submit_without_wait_prints_the_job_id(redis_server, worker, client):
    done = cli(redis_server.url, "submit", "--prompt", "hello", "--set", "num_beams=1", "--set", "max_new_tokens=3")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert client.wait(job_id, 60).state == "succeeded"


def test_submit_with_a_response_format_file_gives_text_in_its_schema(redis_server, worker, tmp_path):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"], "additionalProperties": False}
    path = tmp_path / "format.json"
    path.write_text(json.dumps({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}))
    done = cli(redis_server.url, "submit", "--prompt", "Yes or no?", "--response-format", str(path), "--set", "num_beams=1", "--set", "max_new_tokens=40",
               "--wait", "60", "--json")
    assert done.returncode == 0, done.stderr
    (sequence,) = json.loads(done.stdout)["result"]["sequences"]
    assert json.loads(sequence["text"])["answer"] in ("yes", "no")
    path.write_text(json.dumps({"type": "json_schema", "json_schema": {"name": "answer", "schema": {"oneOf": [schema]}}}))
    refused = cli(redis_server.url, "submit", "--prompt", "hi", "--response-format", str(path))
    assert refused.returncode == 2 and "uses 'oneOf', which structured output does not enforce; use anyOf" in refused.stderr


def test_an_invalid_request_exits_2_and_names_the_parameter(redis_server):
    done = cli(redis_server.url, "submit", "--prompt", "hi", "--set", "temperature=3")
    assert done.returncode == 2
    assert "temperature must be in [0.1, 2.0], got 3" in done.stderr
    typo = cli(redis_server.url, "submit", "--prompt", "hi", "--set", "temprature=0.5")
    assert typo.returncode == 2 and "did you mean 'temperature'" in typo.stderr


def test_a_malformed_set_is_an_invalid_request(redis_server):
    done = cli(redis_server.url, "submit", "--prompt", "hi", "--set", "temperature")
    assert done.returncode == 2 and "--set takes key=value" in done.stderr


def test_the_redis_url_may_follow_the_command_name(redis_server, client):
    job_id = client.submit({"prompt": "never sent"}, queue=UNSERVED)
    done = subprocess.run([sys.executable, "-c", NO_GPU_STACK, "status", job_id, "--redis-url", redis_server.url], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "queued")


def test_a_failed_job_exits_1_and_shows_its_error(redis_server, worker):
    done = cli(redis_server.url, "submit", "--prompt", "天气很好 " * 400, "--set", "num_beams=1", "--wait", "60")
    assert done.returncode == 1
    assert "context_length_exceeded" in done.stdout


def test_waiting_past_the_timeout_exits_3(redis_server, client):
    job_id = client.submit({"prompt": "never sent"}, queue=UNSERVED)  # a job no worker will take
    done = cli(redis_server.url, "result", job_id, "--wait", "0.3", "--json")
    assert done.returncode == 3 and "still queued after 0.3 s" in done.stderr
    assert json.loads(done.stdout)["state"] == "queued"  # the record as it stands
    assert cli(redis_server.url, "result", job_id).returncode == 3


def test_an_unknown_job_exits_1(redis_server):
    done = cli(redis_server.url, "status", "no-such-job")
    assert done.returncode == 1 and "no job 'no-such-job'" in done.stderr


def test_an_unreachable_redis_is_one_line_and_exits_4():
    done = cli("redis://127.0.0.1:1/0", "status", "x")
    assert done.returncode == 4
    assert "cannot reach redis" in done.stderr and "Traceback" not in done.stderr


def test_worker_commands_are_listed_but_not_imported():
    done = subprocess.run([sys.executable, "-c", NO_GPU_STACK, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("submit", "status", "result", "worker", "tiny-model", "demo", "redis"):
        assert command in done.stdout


def test_submit_goes_to_the_queue_named_by_queue(new_database):
    url = new_database()
    bulk = cli(url, "submit", "--prompt", "overnight", "--queue", "bulk")
    interactive = cli(url, "submit", "--prompt", "now")
    assert bulk.returncode == 0 and interactive.returncode == 0, bulk.stderr + interactive.stderr
    with JobClient(Settings(redis_url=url)) as client:
        assert client.redis.hget(keys.job(bulk.stdout.strip()), "queue") == keys.QUEUE_BULK
        assert client.redis.hget(keys.job(interactive.stdout.strip()), "queue") == keys.QUEUE_INTERACTIVE
    wrong = cli(url, "submit", "--prompt", "hi", "--queue", "nightly")
    assert wrong.returncode == 2 and "invalid choice: 'nightly'" in wrong.stderr


def test_output_cut_short_by_its_reader_ends_quietly(new_database):
    url = new_database()
    with JobClient(Settings(redis_url=url)) as client:
        batch_id = client.submit_batch([{"prompt": f"question {i}"} for i in range(3_000)], new=True).batch_id  # ~250 kB of results lines
    reader = subprocess.Popen([sys.executable, "-c", NO_GPU_STACK, "--redis-url", url, "batch", "results", batch_id],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = json.loads(reader.stdout.readline())
    reader.stdout.close()  # as `| head -1` does: the rest cannot fit in the pipe, so the writer meets the closed end
    assert reader.wait(60) == 141
    assert (first["line"], first["state"]) == (1, "queued")
    assert reader.stderr.read() == "", "no 'Broken pipe', no traceback"
    reader.stderr.close()


def test_skip_invalid_writes_the_refused_lines_next_to_the_input(new_database, tmp_path):
    url = new_database()
    source = tmp_path / "bad.jsonl"
    source.write_text('{"prompt": "fine"}\n{"prompt": "hot", "temperature": 9}\n{"prompt": "fine too"}\n', encoding="utf-8")
    done = cli(url, "batch", "submit", str(source), "--skip-invalid")
    assert done.returncode == 0, done.stderr
    refusals = tmp_path / "bad.refused.jsonl"
    assert f"their errors are in {refusals}" in done.stderr
    assert [json.loads(line)["line"] for line in refusals.read_text(encoding="utf-8").splitlines()] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "bad.refused.jsonl"]


def test_cancelling_a_batch_returns_its_counts_by_outcome(new_database):
    import producer

    url = new_database()
    with JobClient(Settings(redis_url=url)) as client:
        batch_id = client.submit_batch([{"prompt": f"question {i}"} for i in range(3)], new=True).batch_id
        text = cli(url, "batch", "cancel", batch_id)
        assert text.returncode == 0 and f"batch {batch_id}: 3 queued jobs cancelled," in text.stdout and "0 had ended already" in text.stdout
        again = client.cancel_batch(batch_id)
        assert isinstance(again, producer.BatchCancellation)
        assert again == producer.BatchCancellation(ended=3)
    shown = cli(url, "batch", "cancel", batch_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"batch_id": batch_id, **dict.fromkeys(producer.BatchCancellation.model_fields, 0), "ended": 3}
