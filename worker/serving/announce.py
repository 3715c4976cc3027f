"""A worker's announcement in Redis: what it serves (model, adapters, hardware profile, device, caps),
renewed every few seconds so that it disappears soon after the worker does; and its process's
liveness key, which says that the jobs and messages the process holds are in hand (worker/serving/lua/start.lua,
worker/serving/unacked.py), renewed only while ``healthy()`` says the process still works through
them.

While Redis refuses writes for lack of memory, both are kept alive by ``EXPIRE`` (which Redis still
serves), and on Redis 7 or later the announcement is rewritten by a script flagged ``allow-oom`` (a
few hundred bytes in place of as many), so that it says since when writes are refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from producer import keys
from producer.fleet import EXPIRES_S, HEARTBEAT_S, SEEN_FOR_S, WorkerInfo
from worker.serving.lua import script
from worker.serving.redis_writes import RedisWrites

log = logging.getLogger("belle.announce")

class Announcer:
    def __init__(self, client: redis.Redis, info: WorkerInfo, *, interval_s: float = HEARTBEAT_S, healthy: Callable[[], bool] = lambda: True,
                 writes: RedisWrites | None = None):
        self.redis = client
        self.info = info
        self.interval_s = interval_s
        self.healthy = healthy
        self.writes = writes or RedisWrites()
        self._stalled = False
        self._full_script: Callable | None = client.register_script(script("beat_while_full"))
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="belle-announce", daemon=True)

    def start(self) -> Announcer:
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(keys.worker(self.info.name), keys.worker_alive(self.info.incarnation))
            pipe.zrem(keys.WORKERS_SEEN, self.info.name)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not withdraw the announcement of %s: %s", self.info.name, exc)

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self._beat()

    def _beat(self) -> None:
        info = self.info.model_copy(update={"heartbeat_at": round(time.time(), 3), "redis_refusing_writes_since": self.writes.refusing_since})
        healthy = self.healthy()
        if not healthy and not self._stalled:
            log.error("%s: the batcher has died or is stuck; its jobs are let go (other workers take them over as their messages return)", info.name)
        self._stalled = not healthy
        announcement, alive = keys.worker(info.name), keys.worker_alive(info.incarnation)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(announcement, info.model_dump_json(), ex=EXPIRES_S)
            pipe.zadd(keys.WORKERS_SEEN, {info.name: info.heartbeat_at})
            pipe.zremrangebyscore(keys.WORKERS_SEEN, "-inf", info.heartbeat_at - SEEN_FOR_S)
            if healthy:
                pipe.set(alive, 1, ex=EXPIRES_S)
                pipe.sadd(keys.HOLDERS, info.incarnation)
            refusal = next((r for r in pipe.execute(raise_on_error=False) if isinstance(r, redis.RedisError)), None)
            if refusal is None:
                self.writes.accepted()
            elif not self.writes.refused(refusal, "renewing the worker's announcement"):
                raise refusal
            else:
                self._beat_while_full(info, healthy)
        except redis.RedisError as exc:
            log.warning("heartbeat of %s failed: %s", info.name, exc)

    def _beat_while_full(self, info: WorkerInfo, healthy: bool) -> None:
        announcement, alive = keys.worker(info.name), keys.worker_alive(info.incarnation)
        info = info.model_copy(update={"redis_refusing_writes_since": self.writes.refusing_since})
        if self._full_script is not None:
            try:
                self._full_script(keys=[announcement, alive], args=[info.model_dump_json(), "1" if healthy else "0", EXPIRES_S])
                return
            except redis.ResponseError as exc:
                if "allow-oom" not in str(exc) and "unexpected symbol" not in str(exc):
                    raise
                self._full_script = None  # Redis before 7: no script flags; keep the keys alive as they are
        pipe = self.redis.pipeline(transaction=False)
        pipe.expire(announcement, EXPIRES_S)
        if healthy:
            pipe.expire(alive, EXPIRES_S)
        pipe.execute()
