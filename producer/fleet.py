"""The fleet: the live workers, as they announce themselves in Redis (what clients read about them), and
the producer's check of a job against them.

Each worker process writes its ``WorkerInfo`` under ``keys.worker(name)`` every few seconds with a
short expiry, so the keys present are the workers alive now (``belle-queue workers``).
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict

from producer import keys
from producer.errors import InvalidRequestError
from producer.schemas import GenerationRequest

HEARTBEAT_S = 2.0  # how often a worker renews its announcement and its liveness
EXPIRES_S = 6  # an announcement not renewed for this long is gone (the worker is taken for dead)


class WorkerInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str  # Celery node name
    incarnation: str = ""  # this process of it (a restarted worker keeps its name, not this)
    host: str
    pid: int
    version: str
    model: str
    adapters: list[str] = []
    device: str
    profile: str | None = None  # hardware profile name
    max_new_tokens: int | None = None  # the profile's caps (None: the request schema's ranges)
    num_beams: int | None = None
    queues: list[str] = []
    batch_max_size: int
    concurrency: int
    started_at: float
    heartbeat_at: float
    redis_refusing_writes_since: float | None = None  # Redis refuses this worker's writes (out of memory) since then


def live_worker_keys(names: list[str]) -> list[str]:
    return [keys.worker(name) for name in sorted(names)]


SEEN_FOR_S = 3600  # a worker stays in the index of announcements this long after its last heartbeat


def seen_since() -> float:
    """The index's workers seen since this (Unix time); whether one lives is whether its announcement does."""
    return time.time() - SEEN_FOR_S


def live_workers(redis) -> list[WorkerInfo]:
    names = redis.zrangebyscore(keys.WORKERS_SEEN, seen_since(), "+inf")
    return parse_workers(redis.mget(live_worker_keys(names)) if names else [])


def parse_workers(values: list[str | None]) -> list[WorkerInfo]:
    workers = []
    for value in values:
        if value:
            try:
                workers.append(WorkerInfo.model_validate_json(value))
            except ValueError:
                continue  # a worker of another version, or a stray key
    return workers


def check_against_workers(request: GenerationRequest, workers: list[WorkerInfo]) -> None:
    """Raise InvalidRequestError when no live worker could run the job: none is announced, none
    serves its adapter, or every one that does caps max_new_tokens or beams below what it asks."""
    if not workers:
        raise InvalidRequestError.single("request", None, "no live worker is announced, so the job cannot be checked; start a worker, or submit without checking workers")
    if request.adapter is not None:
        serving = [w for w in workers if request.adapter in w.adapters]
        if not serving:
            served = sorted({a for w in workers for a in w.adapters})
            raise InvalidRequestError.single("adapter", request.adapter,
                                             f"adapter must be one of the adapters live workers serve ({served}), got {request.adapter!r}")
        workers = serving
    rows = "num_beams" if request.num_beams >= request.num_return_sequences else "num_return_sequences"
    for parameter, value, cap_of in (("max_new_tokens", request.max_new_tokens, lambda w: w.max_new_tokens),
                                     (rows, getattr(request, rows), lambda w: w.num_beams)):
        caps = [cap_of(w) for w in workers]
        if all(cap is not None and cap < value for cap in caps):
            profiles = ", ".join(sorted({f"{w.name} ({w.profile})" for w in workers}))
            raise InvalidRequestError.single(parameter, value, f"{parameter} must be in [1, {max(caps)}] on the live workers ({profiles}), got {value}; "
                                                              f"lower {parameter} or start a worker with a larger hardware profile")
