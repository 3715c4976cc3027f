"""Soak: many small jobs through one worker (tiny BLOOM), in batches of 2,500, with the worker's
resident memory after each: counts must match, and memory must level off after warm-up.

Run: .venv/bin/python -m benchmarks.soak --jobs 20000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import WorkerSubprocess, machine, tiny_bloom
from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.settings import Settings


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--step", type=int, default=2_500)
    args = parser.parse_args()
    model = tiny_bloom()
    print(f"machine: {machine()}\n{args.jobs} jobs (max_new_tokens 2, prompts of 1-7 phrases), worker RSS after each {args.step}")
    with EmbeddedRedis(ephemeral=True) as server, JobClient(Settings(redis_url=server.url)) as client:
        worker = WorkerSubprocess(server.url, model)
        worker.wait_ready(client)
        done, started = 0, time.perf_counter()
        samples = []
        while done < args.jobs:
            batch = client.submit_batch([{"custom_id": f"s{done + i}", "prompt": f"soak {done + i} " * (1 + i % 7), "num_beams": 1, "max_new_tokens": 2,
                                          "min_new_tokens": 2} for i in range(args.step)], new=True)
            while not (status := client.batch_status(batch.batch_id)).finished:
                time.sleep(0.2)
            assert (status.succeeded, status.failed) == (args.step, 0), status
            done += args.step
            samples.append((done, rss_mb(worker.process.pid)))
            print(f"  {done:6d} jobs  {time.perf_counter() - started:6.1f} s  RSS {samples[-1][1]:7.1f} MB")
        worker.stop()
    warm = samples[0][1]
    print(f"RSS after {samples[0][0]} (warm-up): {warm:.1f} MB; after {done}: {samples[-1][1]:.1f} MB ({samples[-1][1] / warm - 1:+.1%}); "
          f"peak {max(s[1] for s in samples):.1f} MB; {done / (time.perf_counter() - started):.0f} jobs/s")


if __name__ == "__main__":
    main()
