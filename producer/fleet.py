"""The fleet: the live workers, as they announce themselves in Redis (what clients read about them), and
the producer's check of a job against them, and a worker's health (``belle-queue health``, a healthcheck).

Each worker process writes its ``WorkerInfo`` under ``keys.worker(name)`` every few seconds with a
short expiry, so the keys present are the workers alive now (``belle-queue workers``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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


@dataclass(frozen=True)
class WorkerHealth:
    healthy: bool
    worker: str | None  # the worker looked at (None: none was found)
    detail: str  # what was seen, or why it is not healthy


def worker_health(redis, name: str | None, *, max_age_s: float = EXPIRES_S, now: float | None = None) -> WorkerHealth:
    """Whether the worker called ``name`` (None: any live worker) lives and works: its announcement is there,
    its heartbeat at most ``max_age_s`` old, and its process's liveness key there. A worker whose batcher has
    died or hangs (a wedged GPU) keeps announcing itself but stops renewing its liveness (worker/serving/announce.py)."""
    now = time.time() if now is None else now
    if name is None:
        workers = live_workers(redis)
        if not workers:
            return WorkerHealth(False, None, "no live worker is announced")
        checked = [worker_health(redis, w.name, max_age_s=max_age_s, now=now) for w in workers]
        return next((h for h in checked if h.healthy), checked[0])
    value = redis.get(keys.worker(name))
    if not value:
        return WorkerHealth(False, name, f"worker {name} is not announced: it is stopped, still loading its model, hung for more than {EXPIRES_S} s, "
                                         "or cannot reach Redis")
    (info,) = parse_workers([value]) or [None]
    if info is None:
        return WorkerHealth(False, name, f"worker {name}'s announcement cannot be read (another version of belle-queue?)")
    age = now - info.heartbeat_at
    if age > max_age_s:
        return WorkerHealth(False, name, f"worker {name}'s last heartbeat was {age:.1f} s ago (more than {max_age_s:g} s)")
    if not redis.exists(keys.worker_alive(info.incarnation)):
        return WorkerHealth(False, name, f"worker {name} (pid {info.pid}) announces itself but its batcher has died or is stuck "
                                         f"(its liveness lapsed): its jobs are being taken over")
    full = " (Redis refuses its writes: out of memory)" if info.redis_refusing_writes_since else ""
    return WorkerHealth(True, name, f"worker {name} (pid {info.pid}, {info.model} on {info.device}): heartbeat {max(age, 0.0):.1f} s ago{full}")


def can_run(worker: WorkerInfo, request: GenerationRequest, queue: str) -> bool:
    """Whether ``worker`` takes jobs from ``queue`` and would run ``request``: it serves its adapter, and its
    hardware profile's caps (as announced) admit its new tokens and its rows (beams or returned sequences)."""
    if queue not in worker.queues or (request.adapter is not None and request.adapter not in worker.adapters):
        return False
    rows = max(request.num_beams, request.num_return_sequences)
    return all(cap is None or value <= cap for value, cap in ((request.max_new_tokens, worker.max_new_tokens), (rows, worker.num_beams)))


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
