"""Fleet metrics: the whole cluster as an autoscaler or a dashboard sees it, read from Redis at scrape time
(a prometheus_client custom collector), whichever process serves them: the gateway's ``/metrics`` and the
standalone ``belle-queue exporter``. Every gateway and exporter shows the same values (they read the same
Redis): aggregate them with ``max``, not ``sum``.

    belle_fleet_up                                   1 when Redis answered this scrape; 0 and nothing else when not
    belle_fleet_queue_waiting_jobs{queue}            jobs of the queue not started yet (on it, or in its fair-share lines)
    belle_fleet_queue_oldest_waiting_seconds{queue}  how long the longest-waiting of them has waited (0: none waits)
    belle_fleet_jobs_ended_total{state, error}       jobs that ended, cluster-wide, by final state and error code ('' for none)
    belle_fleet_live_workers                         workers whose announcement is live
    belle_fleet_workers_refusing_writes              live workers whose writes Redis refuses (out of memory)
    belle_fleet_open_batches                         batches not completed yet
    belle_fleet_open_batch_jobs{progress}            their jobs, summed: progress="total" or "done" (ended in any final state)
    belle_fleet_batch_jobs{batch_id, progress}       the same per batch, for the BELLE_FLEET_BATCH_SERIES newest open ones
    belle_fleet_scrape_seconds                       time this scrape spent reading Redis

The queue label is the queue's short name (``interactive``, ``bulk``). Producer-side: imports neither the
worker nor the GPU stack; prometheus_client comes with the gateway and worker extras.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from producer import fairness, keys
from producer.batches import ENDED, UNDER_WAY
from producer.fleet import WorkerInfo, live_workers

log = logging.getLogger("belle.fleet_metrics")

MAX_OPEN_BATCHES = 10_000  # open batches read per scrape, the newest first (the totals leave out any older ones)
CHUNK = 1_000  # batches read per round trip
BATCH_FIELDS = ("batch_id", "state", "total", *UNDER_WAY, *ENDED, "completed_at")


def queue_label(queue: str) -> str:
    """A queue's label value: its short name (``belle.bulk`` → ``bulk``)."""
    return next((name for name, key in keys.QUEUE_NAMES.items() if key == queue), queue)


@dataclass(frozen=True)
class BatchProgress:
    batch_id: str
    total: int  # its jobs (valid lines)
    done: int  # of them, ended in any final state


@dataclass(frozen=True)
class FleetSnapshot:
    """What one scrape read from Redis."""

    waiting: dict[str, fairness.WaitingJobs]  # by queue name (keys.QUEUES)
    ended: dict[tuple[str, str], int]  # (state, error code) → jobs
    workers: list[WorkerInfo]
    batches: list[BatchProgress]  # the open ones, newest first
    read_at: float  # Unix time


def read_fleet(client: redis.Redis) -> FleetSnapshot:
    """The fleet as Redis holds it now (a few round trips; redis.RedisError when it cannot be read)."""
    waiting = {queue: fairness.waiting_jobs(client, queue) for queue in keys.QUEUES}
    ended: dict[tuple[str, str], int] = {}
    for field, count in client.hgetall(keys.JOBS_ENDED).items():
        state, _, code = field.partition(":")
        ended[(state, code)] = int(count)
    return FleetSnapshot(waiting, ended, live_workers(client), open_batches(client), time.time())


def open_batches(client: redis.Redis) -> list[BatchProgress]:
    """The batches not completed yet, newest first (at most MAX_OPEN_BATCHES): in the open-batches index, their
    hash still there, and being submitted or with jobs under way."""
    names = client.zrevrange(keys.OPEN_BATCHES, 0, MAX_OPEN_BATCHES - 1)
    found: list[BatchProgress] = []
    for start in range(0, len(names), CHUNK):
        pipe = client.pipeline(transaction=False)
        for name in names[start:start + CHUNK]:
            pipe.hmget(name, BATCH_FIELDS)
        for values in pipe.execute():
            fields = dict(zip(BATCH_FIELDS, values, strict=True))
            if fields["total"] is None or fields["completed_at"] is not None:
                continue  # expired, or completed
            count = {name: max(0, int(fields[name] or 0)) for name in ("total", *UNDER_WAY, *ENDED)}
            if fields["state"] != "submitting" and not any(count[name] for name in UNDER_WAY):
                continue  # every job has ended (a batch cancelled while it was being submitted is never marked completed)
            found.append(BatchProgress(fields["batch_id"] or "", count["total"], sum(count[name] for name in ENDED)))
    return found


class FleetCollector:
    """A prometheus_client collector that reads the fleet from Redis at each scrape. ``batch_series``: the
    newest open batches shown one by one (label ``batch_id``); all of them count in the totals."""

    def __init__(self, client: redis.Redis, *, batch_series: int = 20):
        self.redis = client
        self.batch_series = batch_series

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily("belle_fleet_up", "1 when Redis answered this scrape of the fleet metrics; 0 (and no other fleet metric) when not")
        try:
            fleet = read_fleet(self.redis)
        except redis.RedisError as exc:
            log.warning("fleet metrics: Redis could not be read: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families(fleet, self.batch_series)
        spent = GaugeMetricFamily("belle_fleet_scrape_seconds", "Time this scrape spent reading the fleet from Redis")
        spent.add_metric([], time.perf_counter() - started)
        yield spent


def families(fleet: FleetSnapshot, batch_series: int) -> Iterator[Metric]:
    """The metric families of one snapshot (names: the module's docstring)."""
    depth = GaugeMetricFamily("belle_fleet_queue_waiting_jobs", "Jobs of the queue not started yet: on it, or in its fair-share lines "
                              "(what an autoscaler scales workers on)", labels=["queue"])
    oldest = GaugeMetricFamily("belle_fleet_queue_oldest_waiting_seconds", "Time since the submission of the queue's longest-waiting job "
                               "not started yet; 0 when none waits", labels=["queue"])
    for queue, waiting in fleet.waiting.items():
        depth.add_metric([queue_label(queue)], waiting.count)
        age = fleet.read_at - waiting.oldest_created_at if waiting.oldest_created_at is not None else 0.0
        oldest.add_metric([queue_label(queue)], max(0.0, age))
    yield depth
    yield oldest

    ended = CounterMetricFamily("belle_fleet_jobs_ended", "Jobs that ended, cluster-wide, by final state and error code ('' for none)",
                                labels=["state", "error"])
    for (state, code), count in sorted(fleet.ended.items()):
        ended.add_metric([state, code], count)
    yield ended

    yield GaugeMetricFamily("belle_fleet_live_workers", "Workers whose announcement is live (renewed by their heartbeat)", value=len(fleet.workers))
    yield GaugeMetricFamily("belle_fleet_workers_refusing_writes", "Live workers whose writes Redis refuses (out of memory): they take no new job",
                            value=sum(1 for w in fleet.workers if w.redis_refusing_writes_since))

    yield GaugeMetricFamily("belle_fleet_open_batches", "Batches not completed yet", value=len(fleet.batches))
    totals = GaugeMetricFamily("belle_fleet_open_batch_jobs", "Jobs of the open batches, summed: progress=total (all) or done (ended)",
                               labels=["progress"])
    totals.add_metric(["total"], sum(b.total for b in fleet.batches))
    totals.add_metric(["done"], sum(b.done for b in fleet.batches))
    yield totals
    each = GaugeMetricFamily("belle_fleet_batch_jobs", "Jobs of an open batch (the newest BELLE_FLEET_BATCH_SERIES): progress=total or done",
                             labels=["batch_id", "progress"])
    for batch in fleet.batches[:batch_series]:
        each.add_metric([batch.batch_id, "total"], batch.total)
        each.add_metric([batch.batch_id, "done"], batch.done)
    yield each


def fleet_registry(client: redis.Redis, *, batch_series: int = 20) -> CollectorRegistry:
    """A registry holding only the fleet collector (nothing is read from Redis until it is scraped)."""
    registry = CollectorRegistry()
    registry.register(FleetCollector(client, batch_series=batch_series))
    return registry
