"""Failover: Redis Sentinel promotes the replica after the primary is SIGKILLed mid-run, with and without
BELLE_WAIT_REPLICAS, with the replica keeping up and with the link to it holding the last writes back
(a partition between them just before the kill).
All real processes on loopback: a primary, a replica, three sentinels (down-after 1.5 s), a worker (the
~50M BLOOM) and a client submitting 300 jobs (tests/failover.py counts what happened). Then the cost of
WAIT: submits per second and their median latency, with and without it, side by side.

Run: .venv/bin/python -m benchmarks.failover
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import benchmark_model, machine
from producer.client import JobClient
from producer.settings import Settings
from tests.failover import REQUEST, run_failover
from tests.sentinels import DOWN_AFTER_MS, SentinelGroup

FAST_REDELIVERY = {"BELLE_VISIBILITY_TIMEOUT_S": "4", "BELLE_UNACKED_RESTORE_INTERVAL_S": "1", "BELLE_UNACKED_RESTORE_THROTTLE": "1",
                   "BELLE_LOST_MESSAGE_SWEEP_S": "1"}
WAIT_TIMEOUT_MS = 500


def start_worker(url: str, model, wait_replicas: int, log) -> subprocess.Popen:
    env = {**os.environ, **FAST_REDELIVERY, "BELLE_WAIT_REPLICAS": str(wait_replicas), "BELLE_WAIT_TIMEOUT_MS": str(WAIT_TIMEOUT_MS)}
    process = subprocess.Popen([sys.executable, "-m", "worker", "--redis-url", url, "worker", "--model", str(model), "--device", "cpu",
                                "--name", f"ha{wait_replicas}@bench"], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while b" ready." not in (log.seek(0) or log.read()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the worker did not start")
        time.sleep(0.2)
    return process


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()


def submit_cost(url: str, wait_replicas: int, n: int) -> tuple[float, float]:
    """(submits per second, median submit latency in ms) of n submits one after another."""
    latencies = []
    with JobClient(Settings(redis_url=url, wait_replicas=wait_replicas, wait_timeout_ms=WAIT_TIMEOUT_MS)) as client:
        started = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            client.submit({"prompt": f"cost {i}", **REQUEST}, queue="bulk")
            latencies.append(time.perf_counter() - t)
        return n / (time.perf_counter() - started), statistics.median(latencies) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--cost-submits", type=int, default=2000)
    args = parser.parse_args()
    model = benchmark_model()
    print(f"machine: {machine()}\nmodel: {model.name}; {args.jobs} jobs per run ({REQUEST}); sentinels' down-after {DOWN_AFTER_MS} ms; "
          f"BELLE_WAIT_TIMEOUT_MS {WAIT_TIMEOUT_MS}", flush=True)
    rows = []
    for wait_replicas in (0, 1):
        for partitioned in (False, True):
            with SentinelGroup() as group, tempfile.TemporaryFile() as log:
                worker = start_worker(group.url, model, wait_replicas, log)
                try:
                    run = run_failover(group, jobs=args.jobs, wait_replicas=wait_replicas, wait_timeout_ms=WAIT_TIMEOUT_MS, partitioned=partitioned,
                                       tag=f"w{wait_replicas}p{partitioned:d}")
                finally:
                    stop(worker)
            row = {"WAIT replicas": wait_replicas, "replica": "cut off before the kill" if partitioned else "keeping up", **run.summary()}
            rows.append(row)
            print(row, flush=True)
    print("\n| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    with SentinelGroup() as group:
        costs = {w: [] for w in (0, 1)}
        for _ in range(3):  # alternating, medians of 3
            for w in (0, 1):
                costs[w].append(submit_cost(group.url, w, args.cost_submits))
        rate = {w: statistics.median(r for r, _ in costs[w]) for w in costs}
        latency = {w: statistics.median(m for _, m in costs[w]) for w in costs}
    print(f"\nsubmit, one after another ({args.cost_submits} each, medians of 3): without WAIT {rate[0]:,.0f}/s ({latency[0]:.2f} ms), "
          f"with WAIT 1 {rate[1]:,.0f}/s ({latency[1]:.2f} ms): {rate[1] / rate[0]:.2f}x the rate")


if __name__ == "__main__":
    main()
