"""Redis commands per job (issue 20), counted by Redis itself (``INFO commandstats``, reset between
phases; commands run inside Lua scripts count too), by side:

  producer  submitting the jobs (and cancelling, for cancelled jobs), with no worker running
  worker    a worker started on the full queue, until every job has ended, less what the same worker
            does starting up and idling for as long with an empty queue (measured first)
  reader    ``JobClient.wait`` (or ``stream``, for streaming jobs) on every job, once all have ended

for plain jobs, streaming jobs (the default 100 ms chunk interval) and jobs cancelled before a worker
took them. The benchmark's own polling (one EVAL reading the ended-jobs counter) is subtracted.
Then Redis memory per waiting job: a batch of --batch-lines short prompts submitted with no worker
(``INFO memory`` before and after).

Run: .venv/bin/python -m benchmarks.redis_cost --jobs 200
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from benchmarks.common import WorkerSubprocess, machine, mixed_prompts, tiny_bloom
from producer import keys
from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.settings import Settings

ENDED = "local n = 0 for _, v in ipairs(redis.call('HVALS', KEYS[1])) do n = n + tonumber(v) end return n"
POLL = Counter({"eval": 1, "hvals": 1})
IGNORED = {"info", "config", "config|resetstat"}  # the benchmark's own reading and resetting


def stats(r) -> Counter:
    counts = Counter()
    for name, values in r.info("commandstats").items():
        command = name.removeprefix("cmdstat_").lower()
        if command not in IGNORED:
            counts[command] = int(values["calls"])
    return counts


def ended(r) -> int:
    return int(r.eval(ENDED, 1, keys.JOBS_ENDED))


def wait_until(r, count: int, timeout: float) -> int:
    """Poll the ended-jobs counter until it reaches ``count``; returns the polls made."""
    polls, deadline = 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        polls += 1
        if ended(r) >= count:
            return polls
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {count} jobs ended in {timeout} s")


def per_job(counts: Counter, jobs: int) -> dict[str, float]:
    return {name: n / jobs for name, n in counts.most_common() if n > 0}


def line(side: str, counts: Counter, jobs: int) -> str:
    total = sum(v for v in counts.values() if v > 0) / jobs
    top = ", ".join(f"{name} {n:.1f}" for name, n in list(per_job(counts, jobs).items())[:8])
    return f"  {side:9} {total:6.1f} per job   ({top})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-lines", type=int, default=20_000)
    args = parser.parse_args()
    model = tiny_bloom()
    prompts = mixed_prompts(args.jobs)
    print(f"Redis commands per job, {args.jobs} jobs of {args.new_tokens} tokens, the tiny BLOOM; machine: {machine()}")
    with EmbeddedRedis(ephemeral=True) as server, JobClient(Settings(redis_url=server.url)) as client:
        r = client.redis
        # What a worker does starting up and idling, with an empty queue.
        r.config_resetstat()
        started = time.monotonic()
        worker = WorkerSubprocess(server.url, model)
        warm = client.submit({"prompt": "warm up", "num_beams": 1, "max_new_tokens": 1})
        client.wait(warm, 300)
        time.sleep(5)
        baseline, baseline_s = stats(r), time.monotonic() - started
        worker.stop()
        print(f"a worker starting up and idling, {baseline_s:.1f} s: {sum(baseline.values())} commands")
        for kind in ("plain", "streaming", "cancelled"):
            before_ended = ended(r)
            request = {"num_beams": 1, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "stream": kind == "streaming"}
            r.config_resetstat()
            ids = [client.submit({**request, "prompt": p}) for p in prompts]
            if kind == "cancelled":
                for job_id in ids:
                    client.cancel(job_id)
            producer = stats(r)
            r.config_resetstat()
            started = time.monotonic()
            worker = WorkerSubprocess(server.url, model)
            polls = wait_until(r, before_ended + args.jobs, 600)
            seconds = time.monotonic() - started
            worker_side = stats(r)
            worker.stop()
            for name, n in POLL.items():
                worker_side[name] -= n * polls
            scale = min(1.0, seconds / baseline_s)
            for name, n in baseline.items():
                worker_side[name] -= round(n * scale)
            r.config_resetstat()
            for job_id in ids:
                if kind == "streaming":
                    for _ in client.stream(job_id, 60):
                        pass
                else:
                    client.wait(job_id, 60)
            reader = stats(r)
            total = producer + worker_side + reader
            print(f"\n{kind} jobs: {sum(v for v in total.values() if v > 0) / args.jobs:.1f} commands per job end to end")
            print(line("producer", producer, args.jobs))
            print(line("worker", worker_side, args.jobs))
            print(line("reader", reader, args.jobs))
        # Memory per waiting job: a batch submitted with no worker.
        r.flushdb()
        before = r.info("memory")["used_memory"]
        batch = client.submit_batch([{"prompt": p, "num_beams": 1, "max_new_tokens": 16} for p in mixed_prompts(args.batch_lines, seed=7, max_words=6)])
        after = r.info("memory")["used_memory"]
        print(f"\nRedis memory per waiting job, a batch of {batch.created} short prompts: {(after - before) / batch.created:.0f} bytes")


if __name__ == "__main__":
    main()
