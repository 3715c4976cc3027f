"""Shared pieces of the benchmarks: the ~50M-parameter BLOOM, prompts, a worker subprocess, medians."""

from __future__ import annotations

import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from producer.settings import get_settings
from worker.ops.tiny_model import BENCHMARK_SPEC, TINY_SPECS, build_tiny_model

WORDS = ("人工智能 计算机 机器学习 环保 太空探索 北京 上海 长江 天气 公园 the quick brown fox jumps over the lazy dog "
         "beam search sampling temperature model data token question answer").split()


def benchmark_model() -> Path:
    return build_tiny_model(get_settings().cache_dir / "bench-bloom-50m", BENCHMARK_SPEC)


def tiny_bloom() -> Path:
    """The tiny BLOOM of the tests, built once into the cache: for benchmarks that measure the queue."""
    return build_tiny_model(get_settings().cache_dir / "tiny-bloom", TINY_SPECS["bloom"])


def model_for(ref: str | None, default) -> tuple[str, Path | str]:
    """(label, the worker's --model) for a benchmark's --model: ``default()`` (a checkpoint it builds)
    when none is named, else a config name (configs/models), a packaged one prepared into the cache first."""
    if ref is None:
        path = default()
        return path.name, path
    from worker.model.model_config import load_model_config
    from worker.model.packaged_model import prepare

    config = load_model_config(ref, get_settings())
    if config.source is not None:
        prepare(config.source, config.path)
    return config.name, ref


def mixed_prompts(n: int, seed: int = 0, *, max_words: int = 20) -> list[str]:
    """Prompts of mixed lengths: 2 to ``max_words`` words (20: chat questions; 60: long prompts)."""
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(2, max_words))) for _ in range(n)]


def long_prompt(count_tokens, tokens: int, seed: int) -> str:
    """A prompt of ``tokens`` tokens (or just over) as ``count_tokens(text)`` counts them: words as in
    ``mixed_prompts``, for the skewed workloads (a few long prompts among chat questions)."""
    words = " ".join(mixed_prompts(800, seed=seed)).split()
    low, high = 1, len(words)
    while low < high:
        middle = (low + high) // 2
        if count_tokens(" ".join(words[:middle])) < tokens:
            low = middle + 1
        else:
            high = middle
    return " ".join(words[:low])


def with_long_prompts(prompts: list[str], long: list[str]) -> list[str]:
    """``prompts`` with as many of them, spread out, replaced by the ``long`` ones."""
    out = list(prompts)
    for k, text in enumerate(long):
        out[(2 * k + 1) * len(prompts) // (2 * len(long))] = text
    return out


def median_of(runs: int, measure) -> float:
    return statistics.median(measure() for _ in range(runs))


def on_own_thread(work):
    """Run ``work()`` on a thread that ends with it, and return its result. Torch work done on a
    thread that lives on (the main thread) leaves an OpenMP thread team behind, which makes the
    batcher thread's later work a third slower (libgomp throttles spinning when it manages more
    threads than there are CPUs): the seed's loop runs like this so that it does not slow (b)."""
    out: dict = {}

    def target():
        try:
            out["value"] = work()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or platform.platform()}, torch {torch.__version__}"


class WorkerSubprocess:
    """A worker process whose log goes to a temporary file (a pipe nobody reads would fill up and
    block it)."""

    def __init__(self, redis_url: str, model: Path | None, *, env_overrides: dict[str, str] | None = None, device: str = "cpu",
                 command: list[str] | None = None, cwd: Path | None = None):
        """``command``: another worker command line (benchmarks/fleet.py's simulated worker) than `worker` on ``model``."""
        import os
        import tempfile

        self.log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self.process = subprocess.Popen(
            command or [sys.executable, "-m", "worker", "--redis-url", redis_url, "worker", "--model", str(model), "--device", device,
                        "--name", "bench@localhost"],
            cwd=cwd, stdout=subprocess.DEVNULL, stderr=self.log, env={**os.environ, **(env_overrides or {})},
        )

    def wait_ready(self, client, timeout: float = 180) -> None:
        """A first job (which also warms the model up) tells the worker is serving."""
        job_id = client.submit({"prompt": "warm up", "num_beams": 1, "max_new_tokens": 4})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited: {self.read_log()}")
            try:
                client.wait(job_id, 1)
                return
            except TimeoutError:
                continue
        raise TimeoutError("worker did not serve the warm-up job")

    def read_log(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> str:
        """Stop the worker (warm shutdown); returns its log."""
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        text = self.read_log()
        self.log.close()
        return text
