"""The HTTP gateway against the Python client, side by side in one run.

1. Throughput: the same 64 jobs (32 tokens each) sent at once with the async `openai` client through
   the gateway, and with `AsyncJobClient` directly (submit, then wait), against one worker (the ~50M
   BLOOM); median of --runs, as a ratio.
2. Added latency of a 1-token job, one at a time: gateway (plain HTTP, and the `openai` client, whose
   own overhead is part of what a user sees; non-streaming) vs `AsyncJobClient` (submit + wait), p50
   and p99 (tiny BLOOM worker), the three paths taking turns.
3. Open streams: --streams idle server-sent event streams (`/v1/jobs/{id}/events` of jobs no worker
   takes) held by one gateway process: its RSS and CPU while they are open, then every job cancelled
   and every stream's end event counted.

Run: .venv/bin/python -m benchmarks.gateway --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from benchmarks.common import WorkerSubprocess, benchmark_model, machine, mixed_prompts, tiny_bloom
from producer.aio import AsyncJobClient
from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis, free_port
from producer.settings import Settings

JOBS, TOKENS = 64, 32


class Gateway:
    def __init__(self, redis_url: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", "producer.cli", "--redis-url", redis_url, "gateway", "--port", str(self.port)],
                                        stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "BELLE_LOG_LEVEL": "WARNING"})
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(self.url + "/health", timeout=1)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def model_name(client: JobClient) -> str:
    return client.workers()[0].model


async def through_gateway(url: str, model: str, prompts: list[str]) -> float:
    api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    started = time.perf_counter()
    replies = await asyncio.gather(*(api.completions.create(model=model, prompt=p, max_tokens=TOKENS, temperature=0,
                                                             extra_body={"min_new_tokens": TOKENS}) for p in prompts))
    elapsed = time.perf_counter() - started
    await api.close()
    return sum(r.usage.completion_tokens for r in replies) / elapsed


async def direct(redis_url: str, prompts: list[str]) -> float:
    async with AsyncJobClient(Settings(redis_url=redis_url)) as client:
        started = time.perf_counter()
        ids = await asyncio.gather(*(client.submit({"prompt": p, "num_beams": 1, "max_new_tokens": TOKENS, "min_new_tokens": TOKENS}) for p in prompts))
        records = await asyncio.gather(*(client.wait(j, 600) for j in ids))
        elapsed = time.perf_counter() - started
    return sum(r.result.usage.completion_tokens for r in records) / elapsed


async def latencies(url: str, redis_url: str, model: str, n: int) -> dict[str, list[float]]:
    """Milliseconds per 1-token job, one at a time, the three paths taking turns: the `openai` client
    through the gateway, plain HTTP (httpx) through the gateway, and AsyncJobClient directly."""
    api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0)
    times: dict[str, list[float]] = {"openai": [], "http": [], "client": []}
    async with AsyncJobClient(Settings(redis_url=redis_url)) as client, httpx.AsyncClient(base_url=url) as http:
        for i in range(n + 5):  # 5 warm-up rounds
            started = time.perf_counter()
            await api.completions.create(model=model, prompt=f"hi {i}", max_tokens=1, temperature=0)
            openai_s = time.perf_counter() - started
            started = time.perf_counter()
            response = await http.post("/v1/completions", json={"model": model, "prompt": f"hi {i}", "max_tokens": 1, "temperature": 0},
                                       headers={"Authorization": "Bearer bench"})
            http_s = time.perf_counter() - started
            assert response.status_code == 200, response.text
            started = time.perf_counter()
            await client.wait(await client.submit({"prompt": f"hi {i}", "num_beams": 1, "max_new_tokens": 1}), 60)
            client_s = time.perf_counter() - started
            if i >= 5:
                for path, seconds in (("openai", openai_s), ("http", http_s), ("client", client_s)):
                    times[path].append(seconds * 1000)
    await api.close()
    return times


async def open_streams(gateway: Gateway, redis_url: str, n: int, hold_s: float) -> dict:
    async with AsyncJobClient(Settings(redis_url=redis_url)) as client:
        ids = await asyncio.gather(*(client.submit({"prompt": f"idle {i}", "num_beams": 1, "max_new_tokens": 1}) for i in range(n)))
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
        ends, opened = [], asyncio.Event()
        counter = {"open": 0}
        async with httpx.AsyncClient(base_url=gateway.url, timeout=None, limits=limits) as http:

            async def follow(job_id: str) -> None:
                async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                    counter["open"] += 1
                    if counter["open"] == n:
                        opened.set()
                    async for line in response.aiter_lines():
                        if line.startswith("event: end"):
                            ends.append(job_id)
                            return

            rss_before, cpu_before = gateway.rss_mb(), gateway.cpu_s()
            tasks = [asyncio.create_task(follow(j)) for j in ids]
            await asyncio.wait_for(opened.wait(), 120)
            cpu_open, started = gateway.cpu_s(), time.monotonic()
            await asyncio.sleep(hold_s)
            idle_cpu = (gateway.cpu_s() - cpu_open) / (time.monotonic() - started)
            rss_open = gateway.rss_mb()
            await asyncio.gather(*(client.cancel(j) for j in ids))
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return {"streams": n, "ends": len(set(ends)), "rss_before_mb": rss_before, "rss_open_mb": rss_open, "idle_cpu": idle_cpu,
            "open_cpu_s": cpu_open - cpu_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency-jobs", type=int, default=100)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--hold-s", type=float, default=10.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    prompts = mixed_prompts(JOBS)
    with EmbeddedRedis(args=["--databases", "4", "--maxclients", "10000"], ephemeral=True) as server:
        base = server.url.rsplit("/", 1)[0]
        big, tiny, idle = f"{base}/0", f"{base}/1", f"{base}/2"
        with JobClient(Settings(redis_url=big)) as client:
            worker = WorkerSubprocess(big, benchmark_model())
            worker.wait_ready(client)
            gateway = Gateway(big)
            model = model_name(client)
            asyncio.run(direct(big, prompts))  # warm-up of both paths, untimed
            asyncio.run(through_gateway(gateway.url, model, prompts))
            ratios, gateway_rates, direct_rates = [], [], []
            for _ in range(args.runs):
                direct_rates.append(asyncio.run(direct(big, prompts)))
                gateway_rates.append(asyncio.run(through_gateway(gateway.url, model, prompts)))
                ratios.append(gateway_rates[-1] / direct_rates[-1])
            print(f"throughput, {JOBS} jobs x {TOKENS} tokens at once ({model}): direct {statistics.median(direct_rates):.1f} tokens/s, "
                  f"gateway {statistics.median(gateway_rates):.1f} tokens/s; gateway/direct median {statistics.median(ratios):.3f} "
                  f"(runs: {', '.join(f'{r:.3f}' for r in ratios)})")
            gateway.stop()
            worker.stop()
        with JobClient(Settings(redis_url=tiny)) as client:
            worker = WorkerSubprocess(tiny, tiny_bloom())
            worker.wait_ready(client)
            gateway = Gateway(tiny)
            times = asyncio.run(latencies(gateway.url, tiny, model_name(client), args.latency_jobs))
            q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1]  # noqa: E731
            direct_p50, direct_p99 = statistics.median(times["client"]), q(times["client"], 99)
            print(f"latency of a 1-token job, {args.latency_jobs} rounds one at a time: AsyncJobClient p50 {direct_p50:.2f} ms, p99 {direct_p99:.2f} ms")
            for path, label in (("http", "gateway, plain HTTP (httpx)"), ("openai", "gateway, the openai client")):
                p50, p99 = statistics.median(times[path]), q(times[path], 99)
                print(f"  {label}: p50 {p50:.2f} ms, p99 {p99:.2f} ms; added p50 {p50 - direct_p50:.2f} ms, added p99 {p99 - direct_p99:.2f} ms")
            gateway.stop()
            worker.stop()
        gateway = Gateway(idle)
        held = asyncio.run(open_streams(gateway, idle, args.streams, args.hold_s))
        print(f"open streams: {held['streams']} idle event streams on one gateway process: RSS {held['rss_before_mb']:.1f} -> "
              f"{held['rss_open_mb']:.1f} MB ({(held['rss_open_mb'] - held['rss_before_mb']) * 1024 / held['streams']:.1f} KB each), "
              f"CPU {held['idle_cpu'] * 100:.1f} % of a core while they idle, {held['open_cpu_s']:.2f} s to open them; "
              f"{held['ends']}/{held['streams']} ends received after cancelling every job")
        gateway.stop()


if __name__ == "__main__":
    main()
