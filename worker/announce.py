"""A worker's announcement in Redis: what it serves (model, adapters, hardware profile, device, caps),
renewed every few seconds so that it disappears soon after the worker does; and its process's
liveness key, which says that the jobs the process holds are in hand (producer/store.py,
START_SCRIPT), renewed only while ``healthy()`` says the process still works through them."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from producer import keys
from producer.workers import EXPIRES_S, HEARTBEAT_S, WorkerInfo

log = logging.getLogger("belle.announce")


class Announcer:
    def __init__(self, client: redis.Redis, info: WorkerInfo, *, interval_s: float = HEARTBEAT_S, healthy: Callable[[], bool] = lambda: True):
        self.redis = client
        self.info = info
        self.interval_s = interval_s
        self.healthy = healthy
        self._stalled = False
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
            self.redis.delete(keys.worker(self.info.name), keys.worker_alive(self.info.incarnation))
        except redis.RedisError as exc:
            log.warning("could not withdraw the announcement of %s: %s", self.info.name, exc)

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self._beat()

    def _beat(self) -> None:
        info = self.info.model_copy(update={"heartbeat_at": round(time.time(), 3)})
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(keys.worker(info.name), info.model_dump_json(), ex=EXPIRES_S)
            healthy = self.healthy()
            if healthy:
                pipe.set(keys.worker_alive(info.incarnation), 1, ex=EXPIRES_S)
            elif not self._stalled:
                log.error("%s: the batcher has died or is stuck; its jobs are let go (other workers take them over as their messages return)", info.name)
            self._stalled = not healthy
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("heartbeat of %s failed: %s", info.name, exc)
