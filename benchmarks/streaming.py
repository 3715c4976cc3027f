"""The cost of streaming, through the queue: 32 jobs with stream=true against the same 32 with
stream=false, on the ~50M-parameter benchmark BLOOM served by a worker subprocess.

Every streaming job is followed by its own reader (AsyncJobClient.stream, all 32 at once), as a
backend relaying text to its users would; the non-streaming jobs are awaited with wait(). Reports
tokens/s of both, their ratio (target ≥ 0.95), and the time from submit to each job's first chunk.

Run: .venv/bin/python -m benchmarks.streaming --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks.common import WorkerSubprocess, benchmark_model, machine, mixed_prompts, model_for
from producer.aio import AsyncJobClient
from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.records import StreamChunk
from producer.settings import Settings


async def run(client: AsyncJobClient, requests: list[dict], stream: bool) -> tuple[float, list[float]]:
    """Seconds from the first submit to the last job's end, and per job the seconds to its first chunk."""
    first_chunk: list[float] = []
    started = time.perf_counter()
    ids = [await client.submit({**r, "stream": stream}) for r in requests]

    async def follow(job_id: str) -> None:
        seen = False
        async for event in client.stream(job_id, 600):
            if isinstance(event, StreamChunk) and not seen:
                first_chunk.append(time.perf_counter() - started)
                seen = True

    async def wait(job_id: str) -> None:
        record = await client.wait(job_id, 600)
        assert record.result is not None, record.error

    await asyncio.gather(*(follow(j) if stream else wait(j) for j in ids))
    return time.perf_counter() - started, first_chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="alternating pairs of runs; medians are reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="a model config (e.g. smollm2-135m, the real trained model); default: the ~50M BLOOM")
    args = parser.parse_args()

    name, path = model_for(args.model, benchmark_model)
    prompts = mixed_prompts(args.jobs, seed=1)
    requests = [{"prompt": p, "num_beams": 1, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens} for p in prompts]
    tokens = args.jobs * args.new_tokens
    print(f"model: {name}; machine: {machine()}")
    print(f"{args.jobs} jobs × {args.new_tokens} tokens (greedy) through Redis + Celery + 1 worker; {args.runs} alternating pairs")

    with EmbeddedRedis(ephemeral=True) as server:
        worker = WorkerSubprocess(server.url, path, device=args.device)
        with JobClient(Settings(redis_url=server.url)) as client:
            worker.wait_ready(client)

        async def measure():
            plain, streamed, first = [], [], []
            async with AsyncJobClient(Settings(redis_url=server.url)) as client:
                for _ in range(args.runs):
                    seconds, _ = await run(client, requests, stream=False)
                    plain.append(tokens / seconds)
                    seconds, first_chunk = await run(client, requests, stream=True)
                    streamed.append(tokens / seconds)
                    first.extend(first_chunk)
            return plain, streamed, first

        plain, streamed, first = asyncio.run(measure())
        worker.stop()

    p, s = statistics.median(plain), statistics.median(streamed)
    first.sort()
    print(f"\nstream=false  {p:8.1f} tokens/s   (runs: {', '.join(f'{x:.1f}' for x in plain)})")
    print(f"stream=true   {s:8.1f} tokens/s   (runs: {', '.join(f'{x:.1f}' for x in streamed)})")
    print(f"stream/plain = {s / p:.3f}   (target ≥ 0.95)")
    print(f"time to first chunk over {len(first)} jobs: median {statistics.median(first) * 1000:.0f} ms, "
          f"p95 {first[int(0.95 * (len(first) - 1))] * 1000:.0f} ms, min {first[0] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
