"""Interactive latency through the queue, hop by hop, with and without waiting for company.

Part 1, lone jobs: one worker serving the tiny BLOOM; 40 one-token jobs sent one after another with
``JobClient.submit`` + ``wait``. For each: submit→result, and that minus the job's own generation time
(the latency the service adds), and every hop on the way:
  enqueue   submit call → its record written (the record's created_at)
  queued    record written → the attempt's START (message delivery, the task starting; Timings.queued_s)
  admission START → joined the decoding batch (prepare, the batcher's wait; Timings.admission_s)
  first     joined → first token (prefill, first step; Timings.first_token_s)
  rest      first token → the job's end in the batcher (Timings.generation_s - first)
  record    end in the batcher → final record written (finished_at minus the above)
  return    final record written → ``wait`` returns
Run once with the worker's default (no waiting for company) and once with the old 20 ms debounce
(``BELLE_BATCH_WAIT_MS=20``), side by side in one run.

Part 2, a newcomer beside a full batch: while a 64-job batch decodes (64 new tokens each), streaming jobs
arrive one at a time; time from submit to each one's first chunk, against the batch's step time.

Run: .venv/bin/python -m benchmarks.latency
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks.common import WorkerSubprocess, machine, mixed_prompts, tiny_bloom
from producer.aio import AsyncJobClient
from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.records import JobState, StreamChunk
from producer.settings import Settings

HOPS = ("enqueue", "queued", "admission", "first", "rest", "record", "return")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def lone_jobs(client: JobClient, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"total": [], "added": [], **{h: [] for h in HOPS}}
    for i in range(n):
        submitted = time.time()
        job_id = client.submit({"prompt": f"question {i}", "num_beams": 1, "max_new_tokens": 1})
        record = client.wait(job_id, 60)
        returned = time.time()
        t = record.result.timings
        first = t.first_token_s or 0.0
        out["total"].append(returned - submitted)
        out["added"].append(returned - submitted - t.generation_s)
        out["enqueue"].append(record.created_at - submitted)
        out["queued"].append(t.queued_s)
        out["admission"].append(t.admission_s or 0.0)
        out["first"].append(first)
        out["rest"].append(t.generation_s - first)
        out["record"].append(record.finished_at - record.started_at - (t.admission_s or 0.0) - t.generation_s)
        out["return"].append(returned - record.finished_at)
    return out


async def newcomers_beside_a_batch(url: str, *, batch: int, new_tokens: int, newcomers: int) -> tuple[list[float], float]:
    """Seconds from submit to first chunk of each newcomer; and the batch's median step time."""
    client = AsyncJobClient(Settings(redis_url=url))
    try:
        background = [await client.submit({"prompt": p, "num_beams": 1, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
                      for p in mixed_prompts(batch, seed=3)]
        deadline = time.monotonic() + 120
        while await client.status(background[0]) is JobState.QUEUED:  # the batch is decoding once its first job runs
            assert time.monotonic() < deadline, "the background batch never started"
            await asyncio.sleep(0.01)
        first_chunks = []
        for i in range(newcomers):
            started = time.perf_counter()
            job_id = await client.submit({"prompt": f"newcomer {i}", "num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 4, "stream": True})
            async for event in client.stream(job_id, 120):
                if isinstance(event, StreamChunk):
                    first_chunks.append(time.perf_counter() - started)
                    break
            await client.wait(job_id, 120)
        records = [await client.wait(j, 600) for j in background]
        steps = [r.result.timings.generation_s / new_tokens for r in records]
        return first_chunks, statistics.median(steps)
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--newcomers", type=int, default=20)
    args = parser.parse_args()
    model = tiny_bloom()
    print(f"model: tiny BLOOM ({model}); machine: {machine()}")
    with EmbeddedRedis(ephemeral=True) as redis_server:
        url = redis_server.url
        client = JobClient(Settings(redis_url=url))
        rows = []
        for label, env in (("default (no waiting for company)", {}), ("BELLE_BATCH_WAIT_MS=20 (the old debounce)", {"BELLE_BATCH_WAIT_MS": "20"})):
            worker = WorkerSubprocess(url, model, env_overrides=env)
            try:
                worker.wait_ready(client)
                lone_jobs(client, 5)  # warm-up
                hops = lone_jobs(client, args.jobs)
                ttfc, step = asyncio.run(newcomers_beside_a_batch(url, batch=args.batch, new_tokens=64, newcomers=args.newcomers))
            finally:
                worker.stop()
            rows.append((label, hops, ttfc, step))
        client.close()
    ms = lambda s: f"{1000 * s:.1f}"  # noqa: E731
    print(f"\nPart 1: {args.jobs} one-token jobs, one after another (ms)")
    print("| worker | submit→result p50 (p90, p99) | added p50 (p99) | " + " | ".join(f"{h} p50" for h in HOPS) + " |")
    print("|---|---|---|" + "---|" * len(HOPS))
    for label, hops, _, _ in rows:
        total, added = hops["total"], hops["added"]
        print(f"| {label} | {ms(statistics.median(total))} ({ms(percentile(total, 0.9))}, {ms(percentile(total, 0.99))}) | "
              f"{ms(statistics.median(added))} ({ms(percentile(added, 0.99))}) | " + " | ".join(ms(statistics.median(hops[h])) for h in HOPS) + " |")
    print(f"\nPart 2: streaming newcomers beside a {args.batch}-job batch decoding 64 tokens each (ms)")
    print("| worker | first chunk p50 | p99 | the batch's step time (median) | p50 / step |")
    print("|---|---|---|---|---|")
    for label, _, ttfc, step in rows:
        print(f"| {label} | {ms(statistics.median(ttfc))} | {ms(percentile(ttfc, 0.99))} | {ms(step)} | {statistics.median(ttfc) / step:.2f} |")


if __name__ == "__main__":
    main()
