"""Security: Redis AUTH (requirepass and an ACL user) and TLS from the URL alone, one-line errors for
wrong credentials and untrusted certificates, adapter names that cannot reach files, size limits."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis, free_port
from producer.errors import InvalidRequestError
from producer.records import JobState
from producer.schemas import parse_request
from producer.settings import Settings
from tests.conftest import WorkerProcess
from tests.test_cli import cli

QUICK = {"num_beams": 1, "max_new_tokens": 3}


def serve_one_job(url: str, bloom_config, name: str) -> None:
    """A worker and a client on ``url``; one job submitted, run, and read back by the CLI."""
    worker = WorkerProcess(url, bloom_config, name=name)
    try:
        worker.wait_ready()
        with JobClient(Settings(redis_url=url)) as client:
            job_id = client.submit({"prompt": "安全", **QUICK})
            assert client.wait(job_id, 60).state is JobState.SUCCEEDED
        shown = cli(url, "result", job_id, "--json")
        assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "succeeded", shown.stderr
    finally:
        worker.stop()


def assert_one_line(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 4, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr


@pytest.mark.slow  # starts its worker processes itself (serve_one_job), not through the start_worker fixture
def test_requirepass_and_an_acl_user_work_from_the_url_and_a_wrong_password_is_one_line(bloom_config):
    acl_user = ["--user", "belle", "on", ">w0rker-pass", "~*", "&*", "+@all"]
    with EmbeddedRedis(password="s3cret", args=acl_user, ephemeral=True) as server:
        base = f"127.0.0.1:{server.port}/0"
        serve_one_job(f"redis://:s3cret@{base}", bloom_config, "auth@tests")
        serve_one_job(f"redis://belle:w0rker-pass@{base}", bloom_config, "acl@tests")
        assert_one_line(cli(f"redis://:wrong@{base}", "status", "x"), "refused the credentials", "redis://127.0.0.1")
        assert_one_line(cli(f"redis://belle:nope@{base}", "submit", "--prompt", "hi"), "refused the credentials", "redis://belle@127.0.0.1")
        assert_one_line(cli(f"redis://{base}", "status", "x"), "refused the credentials")  # no password at all
        refused = WorkerProcess(f"redis://:wrong@{base}", bloom_config, name="refused@tests")
        assert refused.process.wait(60) == 4
        refused.stop()
        assert "refused the credentials" in refused.log and "Traceback" not in refused.log
        assert "wrong" not in refused.log, "the password is never logged"


def tls_redis_binary() -> str | None:
    for candidate in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if candidate and Path(candidate).is_file():
            help_text = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
            if "v=6" in help_text or "v=7" in help_text or "v=8" in help_text:
                return candidate
    return None


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    binary, openssl = tls_redis_binary(), shutil.which("openssl")
    if binary is None or openssl is None:
        pytest.skip("needs a redis-server built with TLS (Debian's: apt-get install redis-server; `make test` installs it) and openssl")
    d = tmp_path_factory.mktemp("tls")

    def run(*args):
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=belle-test-ca")
    run("req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.cnf")
    port = free_port()
    process = subprocess.Popen([binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "", "--appendonly", "no",
                                "--tls-cert-file", str(d / "server.pem"), "--tls-key-file", str(d / "server.key"), "--tls-ca-cert-file", str(d / "ca.pem"),
                                "--tls-auth-clients", "no", "--requirepass", "tls-s3cret"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    probe = redis.Redis(host="localhost", port=port, password="tls-s3cret", ssl=True, ssl_ca_certs=str(d / "ca.pem"))
    deadline = time.monotonic() + 10
    while True:
        try:
            probe.ping()
            break
        except redis.RedisError:
            if process.poll() is not None:
                pytest.skip(f"this redis-server does not do TLS: {process.stderr.read().decode()[:200]}")
            assert time.monotonic() < deadline
            time.sleep(0.1)
    probe.close()
    yield port, d / "ca.pem"
    process.terminate()
    process.wait(10)
    process.stderr.close()


@pytest.mark.slow  # starts its worker process itself (serve_one_job)
def test_tls_works_from_the_url_and_an_untrusted_certificate_is_one_line(tls_server, bloom_config):
    port, ca = tls_server
    url = f"rediss://:tls-s3cret@localhost:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
    serve_one_job(url, bloom_config, "tls@tests")
    assert_one_line(cli(f"rediss://:tls-s3cret@localhost:{port}/0", "status", "x"), "TLS certificate is not trusted", "ssl_ca_certs")
    assert_one_line(cli(f"redis://:tls-s3cret@localhost:{port}/0", "status", "x"), "cannot reach redis")  # plain text to a TLS port


def test_adapter_names_that_are_paths_are_refused_before_the_queue_and_at_the_worker(live_client, tmp_path):
    for name in ("../poet", "/etc/passwd", "poet/../../x", ".hidden", "a" * 65, "poet\\x"):
        with pytest.raises(InvalidRequestError) as info:
            live_client.submit({"prompt": "hi", "adapter": name})
        assert info.value.parameter == "adapter"
    # A message put on the queue without the producer's check is refused the same way by the worker.
    from producer import keys
    from producer.enqueue import new_job_id, task_message

    job_id = new_job_id()
    live_client.redis.lpush(keys.QUEUE_INTERACTIVE, task_message(job_id, {"prompt": "hi", "adapter": "../../etc/passwd"}, keys.QUEUE_INTERACTIVE))
    deadline = time.monotonic() + 30
    while (record := live_client.store.get(job_id)) is None or not record.is_final:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert record.state is JobState.FAILED and record.error.parameter == "adapter"


def test_size_limits_are_settings(tmp_path, redis_server):
    small = Settings(max_prompt_chars=10, max_messages=2, max_return_sequences=2, max_batch_lines=3, max_batch_line_bytes=200)
    with pytest.raises(InvalidRequestError, match="at most 10 characters"):
        parse_request({"prompt": "x" * 11}, settings=small)
    with pytest.raises(InvalidRequestError, match="at most 2 messages"):
        parse_request({"messages": [{"role": "user", "content": "a"}] * 3}, settings=small)
    with pytest.raises(InvalidRequestError, match=r"num_return_sequences must be in \[1, 2\] \(BELLE_MAX_RETURN_SEQUENCES\)"):
        parse_request({"prompt": "x", "do_sample": True, "num_beams": 1, "num_return_sequences": 3}, settings=small)
    with JobClient(Settings(redis_url=redis_server.url, max_batch_lines=3, max_batch_line_bytes=200)) as client:
        with pytest.raises(InvalidRequestError, match="at most 3 lines"):
            client.submit_batch([{"prompt": f"q{i}"} for i in range(4)])
        path = tmp_path / "long.jsonl"
        path.write_text(json.dumps({"prompt": "x" * 500}) + "\n" + json.dumps({"prompt": "ok"}) + "\n")
        from producer.batches import FileSource

        size = len(path.read_bytes().splitlines(keepends=True)[0])
        with pytest.raises(InvalidRequestError, match=f"line 1: the line is {size} bytes, more than BELLE_MAX_BATCH_LINE_BYTES=200"):
            client.batches.submit(FileSource(path, 200))
