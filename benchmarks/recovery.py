"""Recovery: a supervised worker process holding a full batch is SIGKILLed; how long until every job
it held runs again on another worker process, with the default settings (a visibility timeout of an
hour, so kombu's own redelivery plays no part).

`worker --device cpu --processes 2` (the supervisor restarts the killed child after 1 s), the ~50M
BLOOM so that a batch takes a while, and enough jobs for both children to hold all they can (128
each: 64 decoding, 64 waiting). Each run kills child 1 once both are busy, then times: its liveness
key's expiry, the first and the last of its jobs started again elsewhere. The jobs left are then
cancelled, and the next run starts.

Run: .venv/bin/python -m benchmarks.recovery --runs 3
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

from benchmarks.common import benchmark_model, machine, mixed_prompts
from producer import keys
from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.settings import Settings
from worker.serving.unacked import held_by

REQUEST = {"num_beams": 1, "max_new_tokens": 96, "min_new_tokens": 96}


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
    return value


def one_run(client: JobClient, jobs: int, run: int) -> dict[str, float]:
    workers = wait_until(lambda: {w.name: w for w in client.workers()} if len(client.workers()) == 2 else None, 300, "two workers announced")
    victim = workers["rec-1@bench"]
    ids = [client.submit({"prompt": prompt, **REQUEST}) for prompt in mixed_prompts(jobs, seed=run)]
    wait_until(lambda: len(held_by(client.redis, {victim.incarnation})[victim.incarnation]) >= 128, 300, "child 1 holds 128 messages")
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    pipe = client.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(keys.job(job_id), "state", "holder")
    held = [job_id for job_id, (state, holder) in zip(ids, pipe.execute(), strict=True) if state == "running" and holder == victim.incarnation]
    alive_gone = wait_until(lambda: not client.redis.exists(keys.worker_alive(victim.incarnation)) and time.monotonic(), 60, "liveness expired")
    first = last = None
    while True:
        pipe = client.redis.pipeline(transaction=False)
        for job_id in held:
            pipe.hmget(keys.job(job_id), "state", "holder")
        moved = sum(holder not in (None, victim.incarnation) or state not in ("running", "queued") for state, holder in pipe.execute())
        now = time.monotonic()
        if moved and first is None:
            first = now
        if moved == len(held):
            last = now
            break
        if now - killed > 600:
            raise TimeoutError(f"{moved} of {len(held)} jobs started again after 600 s")
        time.sleep(0.05)
    for job_id in ids:  # make room for the next run
        client.cancel(job_id)
    wait_until(lambda: all(client.get(j).is_final for j in ids), 600, "every job ended")
    return {"held": len(held), "liveness gone": alive_gone - killed, "first started again": first - killed, "all started again": last - killed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=256, help="jobs per run: both children fill up (2 × 128), none left waiting in the queue")
    args = parser.parse_args()
    model = benchmark_model()
    print(f"machine: {machine()}\nmodel: {model}; {args.jobs} jobs per run ({REQUEST}); default settings (visibility timeout 3600 s)")
    results = []
    with EmbeddedRedis(ephemeral=True) as server, JobClient(Settings(redis_url=server.url)) as client, tempfile.TemporaryFile() as log:
        supervisor = subprocess.Popen([sys.executable, "-m", "worker", "--redis-url", server.url, "worker", "--model", str(model), "--device", "cpu",
                                       "--processes", "2", "--name", "rec@bench"], stdout=log, stderr=subprocess.STDOUT)
        try:
            for run in range(args.runs):
                results.append(one_run(client, args.jobs, run))
                print(f"  run {run + 1}: " + ", ".join(f"{k} {v:.1f} s" if k != "held" else f"{v} jobs held" for k, v in results[-1].items()), flush=True)
        finally:
            supervisor.send_signal(signal.SIGTERM)
            try:
                supervisor.wait(120)
            except subprocess.TimeoutExpired:
                supervisor.kill()
    print("median: " + ", ".join(f"{k} {statistics.median(r[k] for r in results):.1f} s" for k in results[0] if k != "held")
          + f" (of {args.runs} kills; {statistics.median(r['held'] for r in results):.0f} jobs held)")


if __name__ == "__main__":
    main()
