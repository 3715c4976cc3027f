"""A fleet against one Redis (issue 20): the jobs/s and concurrent streams at which one Redis saturates,
and the GPUs that corresponds to.

Simulated workers (benchmarks/fleet_worker.py) run the real delivery path: the Celery consumer, the
handler's Lua transitions (start, generating, finish), the chunk publisher at the real interval
(BELLE_STREAM_INTERVAL_MS), the announcer and the sweeper; only the model is a stand-in, one decoding step
every 1/--tokens-per-s seconds for its whole batch, as on a GPU. Client processes submit to the one Redis
with the real ``JobClient``, in open loop (Poisson arrivals at each --rates step), and wait for each job
(plain) or stream it (``stream``, then one ``get`` for its record). Per step:

  jobs/s        submitted per second (all of them end before the next step)
  late p99      planned submit time → the record's created_at: the load generator falling behind
  queue p50/p99 created_at → started_at in the record: queueing delay, the saturation signal
  e2e p50/p99   planned submit → wait (or the stream) returned; ttfc: → the first chunk
  in flight     jobs (or streams) open at once: the sum of their durations over the step's length
  host CPU      this machine's cores busy (all of them: 100 %) over the submitting window, and (ours) by
                this benchmark's processes: more than that is someone else's load
  Redis CPU     Redis's main thread (INFO cpu, user + sys) over the submitting window, and commands/s
                (INFO stats; this benchmark's own INFO calls subtracted); cmds/job: over the step and its
                drain, less the idle fleet's
  ms/job        Redis main-thread CPU per job over the step and its drain, less the idle fleet's share
  100 % at      jobs/s at which that CPU per job fills one core: (1 − idle share) ÷ ms/job

This machine's cores are shared by Redis, the workers and the clients, so the step where p99 queueing
delay rises (measured) is this machine's limit, which may come before Redis's own. The jobs/s at which
Redis's core would be full (extrapolated from its CPU per job) is Redis's limit; the report gives both,
and the GPUs that limit feeds: jobs/s × --new-tokens ÷ --gpu-tokens-per-s (2,500 by default: an assumed
aggregate decode rate of one GPU serving a 7B model at batch, float16). Redis CPU per plain job does not
depend on the answer's length; per streaming job it grows with it (a chunk every interval), so run the
long-answer case with --new-tokens 256 (and lower --rates).

--stream-shards N starts N more redis-servers for the chunk streams and gives their URLs to workers and
clients in BELLE_STREAM_REDIS_URLS (comma-separated; 0, the default: the streams live on the primary); their
CPU (all of them together) is reported beside the primary's.

Run: .venv/bin/python -m benchmarks.fleet                                      (about 2.5 minutes on 2 cores)
     .venv/bin/python -m benchmarks.fleet --new-tokens 256 --rates 5,10,20,30     (long answers; about 3 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import platform
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import redis

from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.errors import BelleError
from producer.records import StreamChunk
from producer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["请解释什么是人工智能", "What is the capital of France?", "写一首关于春天的诗", "Summarise the plot of Hamlet in two sentences."]


# --- the clients (each in a process of its own, its JobClient kept between steps) ---

_client: JobClient | None = None


def _start_client(url: str) -> None:
    global _client
    _client = JobClient(Settings(redis_url=url))


def _ready(_) -> int:
    time.sleep(0.5)  # (held, so that every process of the pool gets one)
    return os.getpid()


def run_clients(rate: float, seconds: float, start_at: float, request: dict, seed: int) -> list[tuple]:
    """Submit at Poisson times from ``start_at`` for ``seconds``; per job (planned, created_at, started_at,
    first chunk, ended, succeeded), wall-clock seconds."""
    rnd = random.Random(seed)
    planned, t = [], rnd.expovariate(rate)
    while t < seconds:
        planned.append(start_at + t)
        t += rnd.expovariate(rate)

    def one(at: float, prompt: str) -> tuple:
        try:
            job_id = _client.submit({**request, "prompt": prompt})
            first = None
            if request["stream"]:
                for event in _client.stream(job_id, 120):
                    if first is None and isinstance(event, StreamChunk):
                        first = time.time()
                record = _client.get(job_id)
            else:
                record = _client.wait(job_id, 120)
            return at, record.created_at, record.started_at, first, time.time(), record.state == "succeeded"
        except (BelleError, redis.RedisError):  # a failed job: counted, not fatal
            return at, None, None, None, time.time(), False

    with ThreadPoolExecutor(max_workers=2048) as pool:  # a thread per open job: the pool grows as needed
        futures = []
        for k, at in enumerate(planned):
            time.sleep(max(0.0, at - time.time()))
            futures.append(pool.submit(one, at, PROMPTS[k % len(PROMPTS)]))
        return [f.result() for f in futures]


# --- Redis's own counters ---

@dataclass(frozen=True)
class Sample:
    at: float
    cpu_s: float  # the main thread's user + sys seconds
    commands: int


def sample(r) -> Sample:
    info = r.info("cpu", "stats")  # one command
    cpu = info.get("used_cpu_user_main_thread", info["used_cpu_user"]) + info.get("used_cpu_sys_main_thread", info["used_cpu_sys"])
    return Sample(time.monotonic(), cpu, info["total_commands_processed"])


def cpu_share(a: Sample, b: Sample) -> float:
    return (b.cpu_s - a.cpu_s) / (b.at - a.at)


def commands_per_s(a: Sample, b: Sample) -> float:
    return (b.commands - a.commands - 1) / (b.at - a.at)  # less the INFO that took sample a


def host_times() -> tuple[int, int, int]:
    """Jiffies of this machine's cores: (busy, total, busy in this process and its descendants: Redis, the
    workers, the clients). Linux /proc; zeros elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0, 0, 0
    parents, used = {}, {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # (after the command's name, which may hold spaces)
            parents[int(entry.name)], used[int(entry.name)] = int(stat[1]), int(stat[11]) + int(stat[12])  # ppid, utime + stime
    ours = {os.getpid()}
    while grown := {p for p, parent in parents.items() if parent in ours and p not in ours}:
        ours |= grown
    return sum(fields) - fields[3] - fields[4], sum(fields), sum(used[p] for p in ours)  # (busy: less idle and iowait)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# --- the fleet ---

def simulated_worker(url: str, name: str, tokens_per_s: float):
    from benchmarks.common import WorkerSubprocess  # (here: the client processes, which import this module, need no torch)

    return WorkerSubprocess(url, None, command=[sys.executable, "-m", "benchmarks.fleet_worker", "--redis-url", url, "--name", name,
                                                "--tokens-per-s", str(tokens_per_s)], cwd=ROOT,
                            env_overrides={"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})


def start_fleet(stack: contextlib.ExitStack, client: JobClient, url: str, workers: int, tokens_per_s: float) -> None:
    fleet = [simulated_worker(url, f"sim-{k}@localhost", tokens_per_s) for k in range(workers)]
    for worker in fleet:
        stack.callback(worker.stop)
    deadline = time.monotonic() + 180
    while len(client.workers()) < workers:
        if time.monotonic() > deadline or any(w.process.poll() is not None for w in fleet):
            dead = next((w for w in fleet if w.process.poll() is not None), fleet[0])
            dead.log.seek(0)
            raise RuntimeError(f"the simulated workers did not all start; a log:\n{dead.log.read()[-3000:]}")
        time.sleep(0.5)
    warm = [client.submit({"prompt": "warm up", "num_beams": 1, "max_new_tokens": 4}) for _ in range(4 * workers)]
    for job_id in warm:
        client.wait(job_id, 120)


@dataclass
class Step:
    rate: float
    jobs: int
    failed: int
    late: list[float]
    queue: list[float]
    e2e: list[float]
    ttfc: list[float]
    in_flight: float
    host: float  # this machine's cores busy over the submitting window (all of them: 1.0)
    ours: float  # of which by this benchmark's processes
    cpu: float  # primary's main-thread share over the submitting window
    commands: float
    shards_cpu: float
    commands_per_job: float
    ms_per_job: float
    saturation: float  # jobs/s at which the primary's main thread would be at 100 %


def run_step(pool, monitors, rate: float, args, request: dict, idle: float, idle_commands: float, seed: int) -> Step:
    r = monitors[0]
    start_at = time.time() + 0.5
    time.sleep(max(0.0, start_at - time.time()))
    s0, shards0, host0 = sample(r), [sample(m) for m in monitors[1:]], host_times()
    futures = [pool.submit(run_clients, rate / args.clients, args.step_s, start_at, request, seed * 100 + k) for k in range(args.clients)]
    time.sleep(max(0.0, start_at + args.step_s - time.time()))
    s1, shards1, host1 = sample(r), [sample(m) for m in monitors[1:]], host_times()
    rows = [row for f in futures for row in f.result()]
    s2 = sample(r)
    ok = [row for row in rows if row[5]]
    busy = (s2.cpu_s - s0.cpu_s) - idle * (s2.at - s0.at)
    ms = 1000 * busy / max(1, len(ok))
    commands = (s2.commands - s0.commands - 2) - idle_commands * (s2.at - s0.at)  # (less the INFOs of s0 and s1)
    return Step(
        rate=rate, jobs=len(rows), failed=len(rows) - len(ok),
        late=[c - at for at, c, *_ in ok], queue=[s - c for _, c, s, *_ in ok], e2e=[end - at for at, _, _, _, end, _ in ok],
        ttfc=[f - at for at, _, _, f, _, _ in ok if f is not None], in_flight=sum(end - c for _, c, _, _, end, _ in ok) / args.step_s,
        host=(host1[0] - host0[0]) / max(1, host1[1] - host0[1]), ours=(host1[2] - host0[2]) / max(1, host1[1] - host0[1]), cpu=cpu_share(s0, s1), commands=commands_per_s(s0, s1),
        shards_cpu=sum(cpu_share(a, b) for a, b in zip(shards0, shards1)),
        commands_per_job=commands / max(1, len(ok)), ms_per_job=ms, saturation=(1 - idle) / (ms / 1000) if ms > 0 else math.inf)


def knee(steps: list[Step]) -> Step | None:
    """The first step whose p99 queueing delay rose: over twice the lowest step's, and 50 ms more."""
    base = percentile(steps[0].queue, 0.99)
    return next((s for s in steps[1:] if percentile(s.queue, 0.99) > max(2 * base, base + 0.05)), None)


def report(mode: str, steps: list[Step], args, idle: float, idle_commands: float) -> None:
    stream = mode == "stream"
    head = f"{'offered':>7} {'jobs/s':>6} {'fail':>4} {'late p99':>8} {'queue p50/p99 ms':>17} {'e2e p50/p99 ms':>15}"
    head += f" {'ttfc p50/p99 ms':>15}" if stream else ""
    head += f" {'in flight':>9} {'host CPU (ours)':>15} {'Redis CPU':>9} {'cmds/s':>7} {'cmds/job':>8} {'ms/job':>6} {'100 % at':>8}" + (f" {'shards CPU':>10}" if args.stream_shards else "")
    print(f"\n{mode} jobs (stream={str(stream).lower()}), {args.new_tokens} tokens each; the idle fleet: Redis CPU {100 * idle:.1f} %, "
          f"{idle_commands:.0f} commands/s")
    print(head)
    for s in steps:
        line = (f"{s.rate:7.0f} {s.jobs / args.step_s:6.1f} {s.failed:4d} {1000 * percentile(s.late, 0.99):8.0f} "
                f"{1000 * percentile(s.queue, 0.5):8.0f}/{1000 * percentile(s.queue, 0.99):<8.0f} "
                f"{1000 * percentile(s.e2e, 0.5):7.0f}/{1000 * percentile(s.e2e, 0.99):<7.0f}")
        if stream:
            line += f" {1000 * percentile(s.ttfc, 0.5):7.0f}/{1000 * percentile(s.ttfc, 0.99):<7.0f}"
        line += f" {s.in_flight:9.1f} {100 * s.host:7.0f}% ({100 * s.ours:3.0f} %) {100 * s.cpu:8.1f}% {s.commands:7.0f} {s.commands_per_job:8.1f} {s.ms_per_job:6.3f} {s.saturation:8.0f}"
        if args.stream_shards:
            line += f" {100 * s.shards_cpu:9.1f}%"
        print(line)
    rose = knee(steps)
    base = steps[0]
    if rose is None:
        print(f"measured: p99 queueing delay did not rise up to {steps[-1].jobs / args.step_s:.1f} jobs/s "
              f"({1000 * percentile(steps[-1].queue, 0.99):.0f} ms; {1000 * percentile(base.queue, 0.99):.0f} ms at the lowest rate); "
              f"Redis's main thread at {100 * steps[-1].cpu:.1f} %")
        basis = steps[-1]
    else:
        print(f"measured: p99 queueing delay rose at {rose.jobs / args.step_s:.1f} jobs/s ({1000 * percentile(rose.queue, 0.99):.0f} ms; "
              f"{1000 * percentile(base.queue, 0.99):.0f} ms at the lowest rate), with Redis's main thread at {100 * rose.cpu:.1f} % and "
              f"the host's cores {100 * rose.host:.0f} % busy: " + ("Redis's limit" if rose.cpu >= 0.9 else
              f"this machine's limit, not Redis's ({os.cpu_count()} cores shared by Redis, {args.workers} workers and {args.clients} client processes)"))
        basis = steps[max(0, steps.index(rose) - 1)]
    mean_s = sum(basis.e2e) / max(1, len(basis.e2e))
    saturation = basis.saturation
    gpus = saturation * args.new_tokens / args.gpu_tokens_per_s
    print(f"extrapolated (from the {basis.rate:.0f} jobs/s step: {basis.ms_per_job:.3f} ms of Redis CPU per job, the idle fleet {100 * idle:.1f} %): "
          f"Redis's main thread at 100 % at {saturation:.0f} jobs/s"
          + (f", {saturation * mean_s:.0f} concurrent streams of {mean_s:.2f} s" if stream else "")
          + f"; × {args.new_tokens} tokens ÷ {args.gpu_tokens_per_s:.0f} tokens/s per GPU (assumed, 7B at batch) = {gpus:.0f} GPUs fed by one Redis")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4, help="simulated worker processes")
    parser.add_argument("--tokens-per-s", type=float, default=40.0, help="the stand-in's decoding steps per second (each sequence's tokens/s)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per job (max_new_tokens, all generated)")
    parser.add_argument("--rates", default="10,25,50,100,150", help="offered jobs/s, one step each, comma-separated")
    parser.add_argument("--step-s", type=float, default=10.0, help="seconds of submitting per step")
    parser.add_argument("--modes", default="plain,stream", help="plain (wait), stream (stream=true, streamed)")
    parser.add_argument("--clients", type=int, default=2, help="client processes (each a JobClient and a thread per open job)")
    parser.add_argument("--idle-s", type=float, default=5.0, help="seconds the idle fleet is measured for")
    parser.add_argument("--stream-shards", type=int, default=0, help="N more redis-servers for the chunk streams (BELLE_STREAM_REDIS_URLS); 0: on the primary")
    parser.add_argument("--gpu-tokens-per-s", type=float, default=2500.0, help="assumed aggregate decode tokens/s of one GPU (7B model at batch)")
    args = parser.parse_args()
    rates = [float(x) for x in args.rates.split(",")]

    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(EmbeddedRedis(ephemeral=True)) for _ in range(1 + args.stream_shards)]
        monitors = [stack.enter_context(redis.Redis.from_url(s.url)) for s in servers]  # the primary's first
        if args.stream_shards:
            os.environ["BELLE_STREAM_REDIS_URLS"] = ",".join(s.url for s in servers[1:])  # (before any Settings, workers and clients alike)
        url = servers[0].url
        client = stack.enter_context(JobClient(Settings(redis_url=url)))
        batch_max = client.settings.batch_max_size
        capacity = args.workers * batch_max * args.tokens_per_s / args.new_tokens
        print(f"fleet: {args.workers} simulated workers (stand-in model: {args.tokens_per_s:g} tokens/s per sequence, batches of ≤{batch_max}; "
              f"capacity {capacity:.0f} jobs/s of {args.new_tokens} tokens), chunk interval {client.settings.stream_interval_ms:g} ms, "
              f"{args.clients} client processes, 1 Redis" + (f" + {args.stream_shards} for the chunk streams" if args.stream_shards else "")
              + f"; {args.step_s:g} s per step; machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        if max(rates) > 0.8 * capacity:
            print(f"note: rates above {0.8 * capacity:.0f} jobs/s load the fleet's batches, not only Redis: add --workers")
        start_fleet(stack, client, url, args.workers, args.tokens_per_s)
        pool = stack.enter_context(ProcessPoolExecutor(args.clients, mp_context=multiprocessing.get_context("spawn"),
                                                       initializer=_start_client, initargs=(url,)))
        list(pool.map(_ready, range(args.clients)))
        time.sleep(1.0)
        a = sample(monitors[0])
        time.sleep(args.idle_s)
        b = sample(monitors[0])
        idle, idle_commands = cpu_share(a, b), commands_per_s(a, b)
        for mode in args.modes.split(","):
            request = {"num_beams": 1, "max_new_tokens": args.new_tokens, "stream": mode == "stream"}
            steps = []
            for k, rate in enumerate(rates):
                steps.append(run_step(pool, monitors, rate, args, request, idle, idle_commands, seed=k))
                time.sleep(1.0)
            report(mode, steps, args, idle, idle_commands)


if __name__ == "__main__":
    main()
