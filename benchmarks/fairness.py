"""Fair shares of the bulk queue between batches (producer/fairness.py), measured in one run.

  (1) enqueue: N validated lines through ``client.submit_batch`` with the fair-share lines (all but the first
      BELLE_BULK_READY_JOBS wait in the batch's line) against the same with them out of the way
      (bulk_ready_jobs = 10⁹: every job straight on the queue, first in first out). Target ≥ 10,000 jobs/s.
  (2) a small batch behind a big one: a worker (tiny BLOOM, 8 new tokens) deep in a --big-line batch; then a
      --small-line batch: its submission to its last result, in the worker's decoding cycles (a bulk job's
      join to its end), and how many of the big batch's jobs ended meanwhile.
  (3) two batches of --pair lines submitted one second apart: the rate of each (jobs/s) while both have work,
      and their ratio. Target 0.8–1.25.

Run: .venv/bin/python -m benchmarks.fairness
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import WorkerSubprocess, machine, model_for, tiny_bloom
from producer import fairness, keys
from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.settings import Settings, get_settings

NEW_TOKENS = 8


def lines(n: int, tag: str) -> list[dict]:
    return [{"prompt": f"{tag} 请解释第 {i} 个问题：什么是人工智能？", "num_beams": 1, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
            for i in range(n)]


def enqueue_rate(url: str, requests: list[dict], ready: int) -> float:
    with JobClient(Settings(redis_url=url, bulk_ready_jobs=ready)) as client:
        client.redis.flushdb()
        started = time.perf_counter()
        submitted = client.submit_batch(requests, new=True)
        rate = submitted.created / (time.perf_counter() - started)
        client.redis.flushdb()
        return rate


def wait_until(condition, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(poll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000, help="lines per enqueue run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--pair", type=int, default=3_000, help="lines in each of the two batches of (3)")
    parser.add_argument("--model", help="a model config (e.g. smollm2-135m); default: the tiny BLOOM")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    name, model = model_for(args.model, tiny_bloom)

    with EmbeddedRedis(args=["--databases", "4"], ephemeral=True) as server:
        base = server.url.rsplit("/", 1)[0]
        fair, fifo = [], []
        for run in range(args.runs):
            requests = lines(args.jobs, f"r{run}")
            fifo.append(enqueue_rate(f"{base}/1", requests, 10**9))
            fair.append(enqueue_rate(f"{base}/1", requests, get_settings().bulk_ready_jobs))
        f, o = statistics.median(fair), statistics.median(fifo)
        print(f"\n(1) enqueue {args.jobs} validated lines, medians of {args.runs} runs")
        print(f"  first in, first out (every job on the queue)   {o:10,.0f} jobs/s")
        print(f"  fair-share lines (the batch waits in its line)  {f:10,.0f} jobs/s   ratio {f / o:.2f}   (target ≥ 10,000 jobs/s)")

        url = f"{base}/2"
        with JobClient(Settings(redis_url=url)) as client:
            worker = WorkerSubprocess(url, model)
            worker.wait_ready(client)
            big = client.submit_batch(lines(args.big, "big"), new=True)
            wait_until(lambda: client.batch_status(big.batch_id).done >= 200, 600, "the big batch is under way")
            before = client.batch_status(big.batch_id).done
            sent = time.time()
            small = client.submit_batch(lines(args.small, "small"), new=True)
            wait_until(lambda: client.batch_status(small.batch_id).done >= args.small, 600, "the small batch has ended")
            took = time.time() - sent
            status = client.batch_status(big.batch_id)
            meanwhile = status.done - before
            cycles = [r.result.timings.generation_s for r in client.iter_batch_results(big.batch_id) if r.result is not None][-500:]
            client.cancel_batch(big.batch_id)
            wait_until(lambda: fairness.waiting_jobs(client.redis, keys.QUEUE_BULK).count == 0, 120, "the big batch's jobs have left")
            cycle = statistics.median(cycles)
            print(f"\n(2) a {args.small}-line batch behind a {args.big}-line one ({name}, {NEW_TOKENS} new tokens)")
            print(f"  submitted → its last result: {took:.2f} s = {took / cycle:.1f} decoding cycles ({cycle * 1000:.0f} ms each); "
                  f"the big batch ended {meanwhile} jobs meanwhile")
            print(f"  first in, first out it would have waited behind {args.big - before:,} jobs: ≈ {(args.big - before) / status.rate:,.0f} s "
                  f"at the big batch's {status.rate:,.0f} jobs/s")

            first = client.submit_batch(lines(args.pair, "first"), new=True)
            time.sleep(1.0)  # (the benchmark's definition: the second comes one second later)
            second = client.submit_batch(lines(args.pair, "second"), new=True)
            samples = []
            while True:
                a, b = client.batch_status(first.batch_id), client.batch_status(second.batch_id)
                samples.append((time.monotonic(), a.done, b.done))
                if a.finished or b.finished:
                    break
                time.sleep(0.25)
            both = [s for s in samples if s[2] > 0]  # from the second's first result to the first end
            (t0, a0, b0), (t1, a1, b1) = both[0], both[-1]
            rate_a, rate_b = (a1 - a0) / (t1 - t0), (b1 - b0) / (t1 - t0)
            print(f"\n(3) two {args.pair}-line batches submitted 1 s apart, while both had work ({t1 - t0:.1f} s)")
            print(f"  first {rate_a:7.1f} jobs/s   second {rate_b:7.1f} jobs/s   ratio {rate_a / rate_b:.2f}   (target 0.8–1.25)")
            client.cancel_batch(first.batch_id)
            client.cancel_batch(second.batch_id)
            worker.stop()


if __name__ == "__main__":
    main()
