"""`belle-queue demo`: a real redis-server on a free port, a tiny local BLOOM (built once, cached), a
worker process, a handful of sample jobs, then a clean shutdown. No network, no GPU."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.errors import InvalidRequestError
from producer.render import record_text
from producer.settings import Settings
from worker.tiny_model import build_tiny_model

SAMPLE_JOBS = [
    ("greedy, English", {"prompt": "What is machine learning?", "preset": "greedy", "max_new_tokens": 24}),
    ("greedy, Chinese", {"prompt": "请解释什么是人工智能", "preset": "greedy", "max_new_tokens": 24}),
    ("beam search, two sequences returned", {"prompt": "写一篇关于环保的短文", "num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 24}),
    ("sampling, creative_writing preset, seeded", {"prompt": "生成一篇关于太空探索的科幻短文", "preset": "creative_writing", "seed": 7, "max_new_tokens": 24}),
    ("multi-turn messages", {"messages": [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "Translate 'good morning' into Chinese."},
    ], "preset": "greedy", "max_new_tokens": 16}),
]
INVALID_JOB = {"prompt": "hello", "temprature": 0.5}


def run_demo(settings: Settings) -> int:
    print("belle-queue demo: the model has RANDOM weights, so its text is gibberish; the plumbing is real.")
    started = time.perf_counter()
    model_path = build_tiny_model(settings.cache_dir / "tiny-bloom")
    print(f"tiny BLOOM checkpoint: {model_path} ({time.perf_counter() - started:.1f} s)")
    with EmbeddedRedis() as server:
        print(f"redis-server: {server.url}")
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "--redis-url", server.url, "worker", "--model", "tiny-bloom", "--device", "cpu", "--name", "demo@localhost"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            return _submit_samples(Settings.model_validate({**settings.model_dump(), "redis_url": server.url}), worker)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            worker.stderr.close()
            print(f"worker stopped; demo finished in {time.perf_counter() - started:.1f} s")


def _submit_samples(settings: Settings, worker: subprocess.Popen) -> int:
    failures = 0
    with JobClient(settings) as client:
        jobs = [(title, client.submit(request)) for title, request in SAMPLE_JOBS]
        print(f"submitted {len(jobs)} jobs; the first waits while the worker loads the model")
        for title, job_id in jobs:
            if worker.poll() is not None:
                print(f"the worker exited with code {worker.returncode}:\n{worker.stderr.read()}", file=sys.stderr)
                return 1
            record = client.wait(job_id, timeout=180)
            print(f"\n== {title}\n{record_text(record, max_chars=120)}")
            failures += record.error is not None
        try:
            client.submit(INVALID_JOB)
        except InvalidRequestError as exc:
            print(f"\n== a request with a typo is refused before it is queued\n  {exc}")
    return 1 if failures else 0
