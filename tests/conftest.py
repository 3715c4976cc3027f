"""Shared fixtures: a real redis-server on a free port, tiny real checkpoints built once per session,
and real worker processes."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.settings import Settings
from tests.waiting import wait_for


# The fixtures that start worker processes: a test using one (directly or through another fixture) is
# marked slow. A test that starts a worker by hand carries @pytest.mark.slow itself.
WORKER_FIXTURES = frozenset({"worker", "start_worker"})


def pytest_collection_modifyitems(config, items):
    """Apply the markers declared in pyproject.toml: ``slow`` on every test that starts worker processes
    (``-m "not slow"`` runs the others), and a skip on every ``gpu`` test where there is no CUDA device.
    ``make test`` selects no marker: it runs them all."""
    for item in items:
        if WORKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_tests:
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs a CUDA GPU")
            for item in gpu_tests:
                item.add_marker(skip)


DATABASES = 128


@pytest.fixture(scope="session")
def redis_server():
    # Tests that need a quiet queue use a database of their own (new_database); 0 is the shared worker's.
    with EmbeddedRedis(args=["--databases", str(DATABASES)], ephemeral=True) as server:
        yield server


@pytest.fixture(scope="session")
def new_database(redis_server):
    """``new_database()``: the URL of a database of the shared server that no other test uses. The one
    place that numbers databases: tests never type a number (database 0 is the shared worker's). Session
    scoped, so that module fixtures can take one too."""
    numbers = itertools.count(1)
    base = redis_server.url.rsplit("/", 1)[0]

    def new() -> str:
        number = next(numbers)
        if number >= DATABASES:
            raise RuntimeError(f"all {DATABASES - 1} test databases are handed out; raise DATABASES in tests/conftest.py")
        return f"{base}/{number}"

    return new


@pytest.fixture(scope="session")
def tiny_bloom(tmp_path_factory) -> Path:
    from worker.ops.tiny_model import TINY_SPECS, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bloom", TINY_SPECS["bloom"])


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from worker.ops.tiny_model import TINY_SPECS, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", TINY_SPECS["llama"])


CONTEXT_LENGTH = 192


@pytest.fixture(scope="session")
def bloom_config(tmp_path_factory, tiny_bloom) -> Path:
    """A model config for the tiny BLOOM with a small context window, so history truncation shows."""
    path = tmp_path_factory.mktemp("configs") / "tiny-bloom.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny-bloom", "path": str(tiny_bloom), "context_length": CONTEXT_LENGTH}))
    return path


class WorkerProcess:
    """A real `belle-queue worker` subprocess; its log is collected for assertions and failures."""

    def __init__(self, redis_url: str, model: Path | str, *, name: str, env: dict[str, str] | None = None):
        self.redis_url = redis_url
        self.name = name
        command = [sys.executable, "-m", "worker", "--redis-url", redis_url, "worker", "--model", str(model), "--device", "cpu", "--name", name]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self._terminated = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log:
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log}")
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def terminate(self) -> None:
        """Ask it to stop (a warm shutdown), without waiting."""
        if self.process.poll() is None and not self._terminated:
            self.process.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        self.process.stdout.close()
        return self.process.returncode


class GatewayProcess:
    """A real `belle-queue gateway` subprocess (uvicorn) on a free port."""

    def __init__(self, redis_url: str, *, env: dict[str, str] | None = None, log_path: Path):
        from producer.embedded_redis import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "producer.cli", "--redis-url", redis_url, "gateway", "--port", str(self.port)],
                                        stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 60) -> GatewayProcess:
        import httpx

        def answers() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log}")
            try:
                return httpx.get(self.url + "/health", timeout=1) is not None
            except httpx.HTTPError:
                return False

        wait_for(answers, timeout, lambda: f"the gateway answers; its log:\n{self.log}")
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def start_gateway(tmp_path_factory):
    started: list[GatewayProcess] = []

    def start(redis_url: str, env: dict[str, str] | None = None) -> GatewayProcess:
        gateway = GatewayProcess(redis_url, env=env, log_path=tmp_path_factory.mktemp("gateway") / "gateway.log")
        started.append(gateway)
        return gateway.wait_ready()

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="session")
def start_worker(redis_server):
    started: list[WorkerProcess] = []

    def start(model, *, name: str, env: dict[str, str] | None = None, redis_url: str | None = None) -> WorkerProcess:
        worker = WorkerProcess(redis_url or redis_server.url, model, name=name, env=env)
        started.append(worker)
        return worker.wait_ready()

    yield start
    for worker in started:  # all at once: each shutdown takes a few seconds
        worker.terminate()
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def worker(start_worker, bloom_config) -> WorkerProcess:
    """The shared worker serving the tiny BLOOM on the default queues."""
    return start_worker(bloom_config, name="shared@tests")


@pytest.fixture
def client(redis_server):
    with JobClient(Settings(redis_url=redis_server.url)) as c:
        yield c


@pytest.fixture
def live_client(client, worker):
    """A client whose jobs are served by the shared worker; checks the worker survived the test."""
    yield client
    assert worker.alive(), f"the worker died during the test:\n{worker.log[-4000:]}"
