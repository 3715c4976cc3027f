"""Whether Redis takes this worker's writes, and what the worker does while it refuses them.

Redis at its ``maxmemory`` with the ``noeviction`` policy (which belle-queue relies on: nothing is
evicted to make room) refuses every command that adds data, and still serves reads, deletions,
expiries and pub/sub. While it does, the worker stays up and loses nothing:
  - it takes no new message off its queues (kombu's record of a message in hand is a write: the one
    message taken when that write was refused is held in memory until it goes through);
  - the jobs it holds keep their messages unacknowledged; their records' writes (start, result) wait
    and are tried again, so no message is acknowledged unless its job has a final record or went back
    to its queue;
  - chunks of streaming jobs and attempt counts are skipped (the final record still holds the text);
  - its announcement and liveness are kept alive (``EXPIRE`` is allowed), its announcement says since
    when writes are refused (where Redis allows it: see worker/serving/announce.py), and so do its metrics.
It resumes by itself once a write goes through.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from producer.connection import is_out_of_memory

log = logging.getLogger("belle.redis")

T = TypeVar("T")

FIRST_RETRY_S = 0.1
MAX_RETRY_S = 2.0
LOG_EVERY_S = 30.0  # near its limit Redis refuses and takes writes in turn: the log says so at most this often...
SETTLED_AFTER_S = 5.0  # ...and it takes writes "again" only once none was refused for this long


class RedisWrites:
    """Shared by every thread of a worker process that writes to Redis."""

    def __init__(self, metrics=None):
        self.metrics = metrics
        self.stopping = threading.Event()  # set at shutdown: waiting writes give up
        self._since: float | None = None  # when Redis began refusing writes (Unix time), None while it takes them
        self._last_refusal = 0.0  # (monotonic)
        self._logged_at = -LOG_EVERY_S  # (monotonic) when a refusal was last logged
        self._lock = threading.Lock()

    @property
    def refusing_since(self) -> float | None:
        return self._since

    def refused(self, exc: BaseException, what: str) -> bool:
        """Note a failed write: True (and the refusal recorded) if Redis refused it for lack of memory."""
        if not is_out_of_memory(exc):
            return False
        with self._lock:
            if self._since is None:
                self._since = time.time()
            self._last_refusal = time.monotonic()
            log_now = time.monotonic() - self._logged_at >= LOG_EVERY_S
            if log_now:
                self._logged_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.redis_refused_writes.labels(what).inc()
            self.metrics.redis_refusing_writes.set(1)
        if log_now:
            log.error("redis refuses writes: it is out of memory (maxmemory reached, noeviction) while %s. This worker takes no new job and "
                      "keeps the ones it holds until writes go through again; free memory in Redis or raise its maxmemory", what)
        return True

    def accepted(self) -> None:
        """A write went through: Redis takes writes (again), once none has been refused for SETTLED_AFTER_S."""
        if self._since is None or time.monotonic() - self._last_refusal < SETTLED_AFTER_S:
            return
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            if self.metrics is not None:
                self.metrics.redis_refusing_writes.set(0)
            log.warning("redis takes writes again (it refused them from %.1f s ago until %.0f s ago); this worker resumes",
                        time.time() - since, SETTLED_AFTER_S)

    def patiently(self, write: Callable[[], T], what: str, *, until_stopping: bool = True) -> T:
        """Run ``write``; while Redis refuses it for lack of memory, wait and try again (backing off up to
        MAX_RETRY_S). Raises the refusal once the worker is stopping (unless not ``until_stopping``);
        other errors at once."""
        delay = FIRST_RETRY_S
        while True:
            try:
                result = write()
            except redis.RedisError as exc:
                if not self.refused(exc, what):
                    raise
                if not until_stopping:
                    time.sleep(delay)
                elif self.stopping.wait(delay):
                    raise
                delay = min(MAX_RETRY_S, delay * 2)
                continue
            self.accepted()
            return result


class PatientStore:
    """A JobStore whose every call waits while Redis refuses writes (``RedisWrites.patiently``)."""

    def __init__(self, store, writes: RedisWrites):
        self._store = store
        self._writes = writes

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)
        if not callable(method):
            return method
        return lambda *args, **kwargs: self._writes.patiently(lambda: method(*args, **kwargs), f"writing a job record ({name})")


class AttemptCounter:
    """Counts a job's attempt in its record when it starts generating (the batcher calls ``starting``
    before it runs the jobs): the count that makes a job that kills its worker fail as worker_lost after
    BELLE_MAX_ATTEMPTS. Best effort: generation goes on while Redis refuses writes."""

    def __init__(self, store, writes: RedisWrites, *, holder: str):
        self.store = store  # has .generating(job_ids, holder=...)
        self.writes = writes
        self.holder = holder

    def starting(self, job_ids: list[str]) -> None:
        try:
            self.store.generating(job_ids, holder=self.holder)
        except redis.RedisError as exc:
            if not self.writes.refused(exc, "counting attempts"):
                log.warning("could not count the attempts of %d jobs: %s", len(job_ids), exc)
