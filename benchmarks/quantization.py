"""Weights' memory and tokens/s of the worker's engine with full-precision, 8-bit and 4-bit weights, at
batch 1 and batch 32 (greedy, through the batcher in-process), side by side in one run.

On CPU: float32 against bitsandbytes 8-bit and 4-bit (NF4, double quantisation) on a ~56M BLOOM whose
layer sizes are multiples of 64 (bitsandbytes' CPU 4-bit path needs that; the throughput benchmark's
model, hidden size 352, does not qualify). On CUDA: float16 against 4-bit, and batch-1 tokens/s as a
fraction of the memory-bandwidth limit (weights' bytes read once per token: bandwidth ÷ weights' bytes).

Run: .venv/bin/python -m benchmarks.quantization                  # CPU
     .venv/bin/python -m benchmarks.quantization --device cuda    # a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import machine, mixed_prompts
from producer.schemas import parse_request
from producer.settings import get_settings
from worker.scheduling.batcher import Batcher
from worker.model.engine import Engine
from worker.model.model_config import ModelConfig
from worker.ops.tiny_model import TinyModelSpec, build_tiny_model, parameter_count

SPEC = TinyModelSpec(vocab_size=8192, hidden_size=384, layers=30, heads=8, initializer_range=0.02, eos_probability=None)
# Peak memory bandwidth of GPUs this may run on, GB/s (vendor figures), by a part of the device name.
HBM_GBPS = {"H200": 4800, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555, "A10": 600, "L4": 300}


def measure(engine_config: ModelConfig, device: str, prompts: list[str], new_tokens: int, runs: int) -> dict:
    batcher = Batcher(None, get_settings()).start(load=lambda: Engine.load(engine_config, device))
    engine = batcher.engine

    def tokens_per_s(count: int) -> float:
        jobs = [engine.prepare(f"q{i}-{time.monotonic_ns()}", parse_request({"prompt": p, "num_beams": 1, "max_new_tokens": new_tokens,
                                                                            "min_new_tokens": new_tokens})) for i, p in enumerate(prompts[:count])]
        started = time.perf_counter()
        for future in [batcher.submit(job) for job in jobs]:
            future.result()
        return count * new_tokens / (time.perf_counter() - started)

    tokens_per_s(4)  # warm-up
    out = {"bytes": engine.model.get_memory_footprint(), "b1": statistics.median(tokens_per_s(1) for _ in range(runs)),
           "b32": statistics.median(tokens_per_s(32) for _ in range(runs))}
    batcher.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", help="a checkpoint folder instead of the built ~56M BLOOM (e.g. a real BELLE-7B-2M on a GPU)")
    args = parser.parse_args()

    path = args.model or str(build_tiny_model(get_settings().cache_dir / "bench-bloom-q56m", SPEC))
    modes = [("float32", "none"), ("float32", "8bit"), ("float32", "4bit")] if args.device == "cpu" else [("float16", "none"), ("float16", "4bit")]
    prompts = mixed_prompts(32, seed=2)
    print(f"model: {path} ({parameter_count(path) / 1e6:.1f}M parameters); device {args.device}; machine: {machine()}")
    print(f"greedy, {args.new_tokens} new tokens per job, medians of {args.runs} runs")
    rows = {}
    for dtype, mode in modes:
        config = ModelConfig(name="q", path=path, dtype=dtype, context_length=2048, quantization=mode)
        rows[(dtype, mode)] = measure(config, args.device, prompts, args.new_tokens, args.runs)
    base = rows[modes[0]]
    bandwidth = None
    if args.device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        bandwidth = next((gbps for part, gbps in HBM_GBPS.items() if part in name), None)
        print(f"GPU: {name}; peak memory bandwidth {bandwidth or 'unknown'} GB/s")
    print(f"\n{'weights':18} {'memory MB':>10} {'vs first':>9} {'batch 1 tok/s':>14} {'batch 32 tok/s':>15} {'b32/b1':>7}" + ("  batch-1 share of bandwidth limit" if bandwidth else ""))
    for (dtype, mode), row in rows.items():
        limit = f"  {row['b1'] / (bandwidth * 1e9 / row['bytes']):.2f} (limit {bandwidth * 1e9 / row['bytes']:.0f} tok/s)" if bandwidth else ""
        print(f"{dtype + ' ' + mode:18} {row['bytes'] / 1e6:10.1f} {row['bytes'] / base['bytes']:9.2f} {row['b1']:14.1f} {row['b32']:15.1f} {row['b32'] / row['b1']:7.1f}{limit}")


if __name__ == "__main__":
    main()
