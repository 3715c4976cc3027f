"""Bulk enqueue speed, and interactive latency behind a bulk backlog.

  (1) enqueue: N validated jobs through ``client.submit_batch`` (every line validated, then record and
      Celery message written by one script per job, pipelined in chunks), and the same through a
      JSONL file (``Batches.submit`` on a file: read and validated twice), against raw pipelined
      Redis writes of the same data (each job's record hash, expiry, message, batch list entry and
      count), measured in the same run. Target: ≥ 5,000 validated jobs/s.
  (2) priority: a worker (tiny BLOOM) deep in a 10,000-job bulk backlog (max_new_tokens 4); then
      interactive jobs one at a time: time from submission to start and to result, against the
      worker's decoding cycle (how long a bulk job decodes) and what the backlog ahead would take.

Run: .venv/bin/python -m benchmarks.batches
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import WorkerSubprocess, machine, model_for, tiny_bloom
from producer import keys
from producer.batches import FileSource
from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.enqueue import task_message
from producer.settings import Settings
from producer.store import canonical_json


def lines(n: int, tag: str) -> list[dict]:
    return [{"custom_id": f"{tag}-{i}", "prompt": f"请解释第 {i} 个问题：什么是人工智能？", "num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 4}
            for i in range(n)]


def raw_writes(client: JobClient, requests: list[dict]) -> float:
    """The same Redis writes as an enqueue, pipelined, without validation or scripts: jobs/s."""
    wires = [{"prompt": r["prompt"], "max_new_tokens": 4} for r in requests]
    started = time.perf_counter()
    for at in range(0, len(wires), 1000):
        pipe = client.redis.pipeline(transaction=False)
        for i, wire in enumerate(wires[at:at + 1000], at):
            job_id = f"raw{i:08d}"
            request_json = canonical_json(wire)
            pipe.hset(keys.job(job_id), mapping={"state": "queued", "created_at": 0, "attempts": 0, "request": request_json, "batch": "b", "custom_id": i, "line": i})
            pipe.expire(keys.job(job_id), 3600)
            pipe.lpush("raw.queue", task_message(job_id, wire, "raw.queue"))
            pipe.rpush("raw.batch.jobs", job_id)
            pipe.hincrby("raw.batch", "queued", 1)
        pipe.execute()
    return len(wires) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per enqueue run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-enqueue", action="store_true", help="only the priority part")
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--interactive", type=int, default=7, help="interactive jobs sent behind the backlog, one at a time")
    parser.add_argument("--model", help="the priority part's model config (e.g. smollm2-135m, the real trained model); default: the tiny BLOOM")
    args = parser.parse_args()
    print(f"machine: {machine()}")

    with EmbeddedRedis(args=["--databases", "4"], ephemeral=True) as server:
        enqueue_url, backlog_url = server.url.rsplit("/", 1)[0] + "/1", server.url.rsplit("/", 1)[0] + "/2"
        with JobClient(Settings(redis_url=enqueue_url)) as client, tempfile.TemporaryDirectory() as tmp:
            api, from_file, raw = [], [], []
            runs = 0 if args.skip_enqueue else args.runs
            for run in range(runs):
                client.redis.flushdb()
                requests = lines(args.jobs, f"r{run}")
                raw.append(raw_writes(client, requests))
                client.redis.flushdb()
                started = time.perf_counter()
                submitted = client.submit_batch(requests, new=True)
                api.append(submitted.created / (time.perf_counter() - started))
                client.redis.flushdb()
                path = Path(tmp) / f"run{run}.jsonl"
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests), encoding="utf-8")
                started = time.perf_counter()
                submitted = client.batches.submit(FileSource(path, client.settings.max_batch_line_bytes), new=True, progress=False)
                from_file.append(submitted.created / (time.perf_counter() - started))
            client.redis.flushdb()
        if runs:
            r, a, f = statistics.median(raw), statistics.median(api), statistics.median(from_file)
            print(f"\n(1) enqueue {args.jobs} jobs, medians of {args.runs} runs")
            print(f"  raw pipelined Redis writes (no validation)   {r:10,.0f} jobs/s")
            print(f"  client.submit_batch (validated, in memory)   {a:10,.0f} jobs/s   ratio to raw {a / r:.2f}   (target ≥ 5,000 jobs/s)")
            print(f"  batch submit from a JSONL file               {f:10,.0f} jobs/s   ratio to raw {f / r:.2f}")

        name, model = model_for(args.model, tiny_bloom)
        with JobClient(Settings(redis_url=backlog_url)) as client:
            backlog = client.submit_batch(lines(args.backlog, "bulk"), new=True)
            worker = WorkerSubprocess(backlog_url, model)
            worker.wait_ready(client)
            while client.batch_status(backlog.batch_id).succeeded < 500:
                time.sleep(0.05)
            start_waits, totals, ahead = [], [], []
            for _ in range(args.interactive):
                status = client.batch_status(backlog.batch_id)
                ahead.append(status.queued)
                rate = status.rate
                sent = time.time()
                record = client.wait(client.submit({"prompt": "an interactive question", "num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 4}), 120)
                start_waits.append(record.started_at - sent)
                totals.append(time.time() - sent)
                time.sleep(0.5)
            cycles = [r.result.timings.generation_s for r in client.iter_batch_results(backlog.batch_id) if r.result is not None][-500:]
            client.cancel_batch(backlog.batch_id)
            worker.stop()
        cycle = statistics.median(cycles)
        print(f"\n(2) interactive jobs behind a {args.backlog}-job bulk backlog ({name}, 4 new tokens), {args.interactive} jobs")
        print(f"  submitted → started   median {statistics.median(start_waits) * 1000:7.1f} ms   max {max(start_waits) * 1000:7.1f} ms")
        print(f"  submitted → result    median {statistics.median(totals) * 1000:7.1f} ms   max {max(totals) * 1000:7.1f} ms")
        print(f"  decoding cycle (a bulk job's first join to its end, median of the last 500): {cycle * 1000:.1f} ms")
        print(f"  bulk jobs ahead when each was sent: median {statistics.median(ahead):,.0f}; in FIFO order they would take ≈ "
              f"{statistics.median(ahead) / rate:,.0f} s at the backlog's {rate:,.0f} jobs/s")


if __name__ == "__main__":
    main()
