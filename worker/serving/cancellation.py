"""Which of this worker's jobs have been cancelled while running.

The client's cancel script flags the record and publishes the job id on ``keys.CANCEL_CHANNEL``.
A listener thread keeps the ids of this worker's jobs that were named there; the batcher asks at every
decoding step (a set lookup, no Redis round trip). A job is registered before its record is started,
so a cancellation either finds the job queued (and ends it there) or reaches this listener; after a
reconnection the listener re-reads the flags of all registered jobs, in case a message was missed.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from producer import keys
from worker.scheduling.holders import Holds

log = logging.getLogger("belle.cancel")


class CancelWatcher:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._registered = Holds()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._subscribed = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="belle-cancel", daemon=True)

    def start(self, timeout: float = 10.0) -> CancelWatcher:
        self._thread.start()
        self._subscribed.wait(timeout)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)

    def register(self, job_id: str) -> None:
        with self._lock:
            self._registered.add(job_id)

    def unregister(self, job_id: str) -> None:
        with self._lock:
            if self._registered.release(job_id):
                self._cancelled.discard(job_id)

    def is_cancelled(self, job_id: str) -> bool:
        return job_id in self._cancelled

    def _mark(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._registered:
                self._cancelled.add(job_id)
                log.info("job %s: cancellation requested; it stops at its next decoding step", job_id)

    def _resync(self) -> None:
        with self._lock:
            registered = list(self._registered)
        if not registered:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job_id in registered:
            pipe.hexists(keys.job(job_id), "cancel_requested_at")
        for job_id, flagged in zip(registered, pipe.execute(), strict=True):
            if flagged:
                self._mark(job_id)

    def _listen(self) -> None:
        while not self._stopping.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.CANCEL_CHANNEL)
                self._resync()
                self._subscribed.set()
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message and isinstance(message.get("data"), str):
                        self._mark(message["data"])
            except redis.RedisError as exc:
                log.warning("cancel listener lost Redis (%s); reconnecting", exc)
                time.sleep(1)
            finally:
                pubsub.close()
