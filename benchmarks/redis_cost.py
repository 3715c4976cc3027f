"""Redis commands and round trips per job (issue 20), counted by Redis itself: ``INFO commandstats`` (reset
between phases; the commands run inside Lua scripts count too) and ``INFO stats``'s
``total_reads_processed`` (read events on client connections: one per request or pipeline, a round trip).

By side, for plain, streaming (the default 100 ms chunk interval), batch and cancelled jobs:
  producer  submitting the jobs (and cancelling, for cancelled jobs), with no worker running
  worker    a worker started on the full queue, until every job has ended, less what the same worker
            does starting up and idling for as long with an empty queue (measured first)
  reader    ``JobClient.wait`` (``stream`` for streaming jobs, ``iter_batch_results`` for a batch) on every
            job, once all have ended
Then end to end with live readers, as a backend uses it: a worker already running, and --clients threads
each submitting a job and waiting for it (or streaming it) before the next; less the worker's idling. For
streaming jobs this gives the commands per chunk: the difference with plain jobs, over the chunks read.
The benchmark's own polling (one EVAL reading the ended-jobs counter) and its INFO calls are subtracted.

Redis memory per waiting job: a batch of --batch-lines short prompts submitted with no worker (``INFO
memory`` before and after); and per finished job with its result (the live plain jobs, once ended).

Run: .venv/bin/python -m benchmarks.redis_cost --jobs 200
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter

from benchmarks.common import WorkerSubprocess, machine, mixed_prompts, tiny_bloom
from producer import keys
from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.records import StreamChunk
from producer.schemas import parse_request, stored_form
from producer.settings import Settings
from producer.store import canonical_json

ENDED = "local n = 0 for _, v in ipairs(redis.call('HVALS', KEYS[1])) do n = n + tonumber(v) end return n"
POLL = Counter({"eval": 1, "hvals": 1, "round trips": 1})
IGNORED = {"info", "config", "config|resetstat"}  # the benchmark's own reading and resetting
TRIPS = "round trips"
CPU_MS, SCRIPTS_MS = "cpu ms", "scripts ms"  # (not commands: Redis's CPU, and its scripts' share of it, in the live runs)
NOT_COMMANDS = {TRIPS, CPU_MS, SCRIPTS_MS}


def stats(r) -> Counter:
    """Commands by name since the last reset, and the round trips (less this call's own)."""
    counts = Counter()
    for name, values in r.info("commandstats").items():
        command = name.removeprefix("cmdstat_").lower()
        if command not in IGNORED:
            counts[command] = int(values["calls"])
    counts[TRIPS] = int(r.info("stats")["total_reads_processed"]) - 2  # (the two INFO calls)
    return counts


def cpu_and_script_time(r) -> tuple[float, float]:
    """Redis's CPU seconds so far (user + system), and the seconds its scripts ran since the last reset
    (EVALSHA and EVAL, the commands they call included)."""
    cpu = r.info("cpu")
    scripts = sum(int(v["usec"]) for name, v in r.info("commandstats").items() if name.removeprefix("cmdstat_") in ("evalsha", "eval")) / 1e6
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), scripts


def reset(r) -> None:
    r.config_resetstat()


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


def commands(counts: Counter) -> int:
    return sum(n for name, n in counts.items() if name not in NOT_COMMANDS and n > 0)


def line(side: str, counts: Counter, jobs: int) -> str:
    top = ", ".join(f"{name} {n / jobs:.1f}" for name, n in counts.most_common() if name not in NOT_COMMANDS and n >= jobs / 20)
    return f"  {side:9} {commands(counts) / jobs:6.1f} commands, {max(0, counts[TRIPS]) / jobs:5.1f} round trips per job   ({top})"


def less_idling(counts: Counter, idle: Counter, idle_s: float, seconds: float) -> Counter:
    """``counts`` less what an idle worker does in ``seconds`` (``idle`` over ``idle_s``)."""
    counts = Counter(counts)
    for name, n in idle.items():
        counts[name] -= round(n * seconds / idle_s)
    return counts


def by_side(client, r, url, model, kind: str, prompts: list[str], new_tokens: int, idle: Counter, idle_s: float) -> None:
    jobs = len(prompts)
    before_ended = ended(r)
    request = {"num_beams": 1, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "stream": kind == "streaming"}
    reset(r)
    if kind == "batch":
        batch_id = client.submit_batch([{**request, "prompt": p} for p in prompts]).batch_id
    else:
        ids = [client.submit({**request, "prompt": p}) for p in prompts]
    if kind == "cancelled":
        for job_id in ids:
            client.cancel(job_id)
    producer = stats(r)
    reset(r)
    started = time.monotonic()
    worker = WorkerSubprocess(url, model)
    polls = wait_until(r, before_ended + jobs, 600)
    worker_side = less_idling(stats(r), idle, idle_s, time.monotonic() - started)
    worker.stop()
    for name, n in POLL.items():
        worker_side[name] -= n * polls
    reset(r)
    if kind == "batch":
        assert sum(1 for _ in client.iter_batch_results(batch_id)) == jobs
    for job_id in ids if kind != "batch" else []:
        if kind == "streaming":
            for _ in client.stream(job_id, 60):
                pass
        else:
            client.wait(job_id, 60)
    reader = stats(r)
    total = producer + worker_side + reader
    print(f"\n{kind} jobs: {commands(total) / jobs:.1f} commands, {max(0, total[TRIPS]) / jobs:.1f} round trips per job end to end")
    print(line("producer", producer, jobs))
    print(line("worker", worker_side, jobs))
    print(line("reader", reader, jobs))


def live(client_settings: Settings, r, prompts: list[str], new_tokens: int, clients: int, streaming: bool, idle: Counter, idle_s: float,
         ids: list[str] | None = None) -> tuple[Counter, int]:
    """Every job submitted and waited for (or streamed) by one of ``clients`` threads; returns the commands
    (less the worker's idling) and the chunks read. ``ids``: gets the jobs' ids."""
    request = {"num_beams": 1, "max_new_tokens": new_tokens, "min_new_tokens": min(new_tokens, 100), "stream": streaming}
    shares = [prompts[i::clients] for i in range(clients)]
    chunks = Counter()

    def run(share: list[str], slot: int) -> None:
        with JobClient(client_settings) as client:
            for prompt in share:
                job_id = client.submit({**request, "prompt": prompt})
                if ids is not None:
                    ids.append(job_id)
                if streaming:
                    chunks[slot] += sum(isinstance(e, StreamChunk) for e in client.stream(job_id, 120))
                else:
                    client.wait(job_id, 120)

    reset(r)
    cpu_before, _ = cpu_and_script_time(r)
    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(share, slot)) for slot, share in enumerate(shares)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu_after, scripts = cpu_and_script_time(r)
    counts = less_idling(stats(r), idle, idle_s, time.monotonic() - started)
    counts[CPU_MS] = 1000 * (cpu_after - cpu_before)
    counts[SCRIPTS_MS] = 1000 * scripts
    return counts, sum(chunks.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8, help="threads submitting and waiting, in the live runs")
    parser.add_argument("--batch-lines", type=int, default=20_000)
    args = parser.parse_args()
    model = tiny_bloom()
    prompts = mixed_prompts(args.jobs)
    print(f"Redis commands per job, {args.jobs} jobs of {args.new_tokens} tokens, the tiny BLOOM; machine: {machine()}")
    with EmbeddedRedis(ephemeral=True) as server, JobClient(Settings(redis_url=server.url)) as client:
        r = client.redis
        print(f"Redis {r.info('server')['redis_version']}")
        # What a worker does starting up and idling, with an empty queue.
        reset(r)
        started = time.monotonic()
        worker = WorkerSubprocess(server.url, model)
        client.wait(client.submit({"prompt": "warm up", "num_beams": 1, "max_new_tokens": 1}), 300)
        time.sleep(5)
        idle, idle_s = stats(r), time.monotonic() - started
        worker.stop()
        print(f"a worker starting up and idling, {idle_s:.1f} s: {commands(idle)} commands")
        for kind in ("plain", "streaming", "batch", "cancelled"):
            by_side(client, r, server.url, model, kind, prompts, args.new_tokens, idle, idle_s)

        # End to end with live readers, a worker already running; and memory per finished job.
        worker = WorkerSubprocess(server.url, model)
        worker.wait_ready(client)
        time.sleep(3)  # (its start-up writes done: what follows is its idling, as measured)
        finished: list[str] = []
        plain, _ = live(client.settings, r, prompts, args.new_tokens, args.clients, False, idle, idle_s, finished)
        record_bytes = sum(r.memory_usage(keys.job(job_id), samples=0) for job_id in finished) / len(finished)
        streaming, chunks = live(client.settings, r, prompts, args.new_tokens, args.clients, True, idle, idle_s)
        longer, more_chunks = live(client.settings, r, prompts, 4 * args.new_tokens, args.clients, True, idle, idle_s)
        worker.stop()
        jobs = len(prompts)
        print(f"\nlive, {args.clients} client threads each submitting a job and waiting for it before the next:")
        for name, counts in (("plain", plain), ("streaming", streaming), (f"streaming, {4 * args.new_tokens} tokens", longer)):
            print(line(name, counts, jobs))
            print(f"  {'':9} Redis CPU {counts[CPU_MS] / jobs:.3f} ms per job, its scripts {counts[SCRIPTS_MS] / jobs:.3f} ms of it")
        print(f"  streaming: {chunks / jobs:.1f} and {more_chunks / jobs:.1f} chunks read per job; a chunk more costs "
              f"{(commands(longer) - commands(streaming)) / (more_chunks - chunks):.2f} commands and "
              f"{(longer[TRIPS] - streaming[TRIPS]) / (more_chunks - chunks):.2f} round trips; a streamed job "
              f"{(commands(streaming) - commands(plain)) / jobs:.1f} commands more than a plain one at {args.new_tokens} tokens")
        print(f"\nRedis memory per finished job with its result ({args.new_tokens} tokens), the live plain jobs' records (MEMORY USAGE): "
              f"{record_bytes:.0f} bytes")

        # Memory per waiting job: a batch submitted with no worker.
        lines = [{"prompt": p, "num_beams": 1, "max_new_tokens": 16} for p in mixed_prompts(args.batch_lines, seed=7, max_words=6)]
        prompt_bytes = sum(len(line["prompt"].encode()) for line in lines) / len(lines)
        stored_bytes = sum(len(canonical_json(stored_form(parse_request(line).to_wire())).encode()) for line in lines) / len(lines)
        print(f"\nRedis memory per waiting job, a batch of {len(lines)} short prompts ({prompt_bytes:.0f} bytes on average; the request as "
              f"stored, {stored_bytes:.0f} bytes):")
        r.flushdb()
        print(f"  {waiting_bytes(client, lines):.0f} bytes (hash-max-listpack-value 1024: the embedded Redis's and docker-compose's)")
    with EmbeddedRedis(ephemeral=True, args=["--hash-max-listpack-value", "64"]) as server, JobClient(Settings(redis_url=server.url)) as client:
        print(f"  {waiting_bytes(client, lines):.0f} bytes (hash-max-listpack-value 64: Redis's default)")


def waiting_bytes(client: JobClient, lines: list[dict]) -> float:
    """Redis memory per job of a batch of ``lines`` submitted with no worker; also the stored request's size."""
    before = client.redis.info("memory")["used_memory"]
    batch = client.submit_batch(lines)
    after = client.redis.info("memory")["used_memory"]
    return (after - before) / batch.created

if __name__ == "__main__":
    main()
