"""The checks that need a CUDA GPU: a real CUDA out-of-memory error, 4-bit weights on the GPU, and
float16 batches. Skipped, with the reason, where there is none (CI, a laptop)."""

from __future__ import annotations

import pytest
import torch

from producer.errors import ErrorCode
from producer.schemas import parse_request
from producer.settings import Settings
from worker.scheduling.batcher import Batcher
from worker.model.engine import Engine
from worker.errors import JobFailure
from worker.model.model_config import ModelConfig

# Skipped by tests/conftest.py where there is no CUDA device.
pytestmark = pytest.mark.gpu

PROMPTS = ["Hi", "你好", "What is machine learning?", "The quick brown fox jumps over the lazy dog.", "北京", "温度控制输出的随机性"]


def load(path, **fields) -> Engine:
    return Engine.load(ModelConfig(**{"name": "tiny-gpu", "path": str(path), "context_length": 512, **fields}), "cuda")


def greedy(engine: Engine, job_id: str, prompt: str, **data):
    return engine.prepare(job_id, parse_request({"prompt": prompt, "num_beams": 1, "max_new_tokens": 10, "min_new_tokens": 10, **data}))


def run_batched(engine: Engine, jobs) -> dict:
    batcher = Batcher(engine, Settings(batch_wait_ms=50, batch_max_delay_ms=500)).start()
    try:
        futures = {job.job_id: batcher.submit(job) for job in jobs}
        return {job_id: future.result(timeout=120).result for job_id, future in futures.items()}
    finally:
        batcher.stop()


@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_float16_batches_on_the_gpu_give_each_job_its_output_alone(request, arch):
    engine = load(request.getfixturevalue(f"tiny_{arch}"), dtype="float16")
    assert engine.model.dtype is torch.float16 and engine.device.type == "cuda"
    jobs = [greedy(engine, f"h{i}", p) for i, p in enumerate(PROMPTS)]
    alone = {job.job_id: engine.generate_batch([job])[0].result for job in jobs}
    batched = run_batched(engine, jobs)
    for job in jobs:
        # float16 sums differ between batch shapes: compare the first tokens, before the noise adds up.
        assert batched[job.job_id].sequences[0].token_ids[:3] == alone[job.job_id].sequences[0].token_ids[:3], job.job_id


@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_4bit_weights_load_on_the_gpu_and_generate(request, arch):
    path = request.getfixturevalue(f"tiny_{arch}")
    full = load(path, dtype="float16")
    quantised = load(path, dtype="float16", quantization="4bit")
    assert quantised.model.get_memory_footprint() < 0.9 * full.model.get_memory_footprint()
    assert any(type(m).__module__.startswith("bitsandbytes") for m in quantised.model.modules())
    results = run_batched(quantised, [greedy(quantised, f"q{i}", p) for i, p in enumerate(PROMPTS)])
    assert all(len(r.sequences[0].token_ids) == 10 for r in results.values())


def test_a_real_cuda_out_of_memory_fails_only_the_job_too_big_and_the_worker_goes_on(tiny_bloom):
    engine = load(tiny_bloom, dtype="float16", context_length=2048)
    small = [greedy(engine, f"s{i}", p) for i, p in enumerate(PROMPTS)]
    big = greedy(engine, "big", "天气很好 " * 60, max_new_tokens=1800, min_new_tokens=1800, num_return_sequences=8, do_sample=True, seed=1)

    def peak(jobs) -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        engine.generate_batch(jobs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    small_peak, big_peak = peak(small[:1]), peak([big])
    assert big_peak >= 8 * small_peak and big_peak >= 8 << 20, f"the big job must need far more memory than a small one: {big_peak} B, {small_peak} B"
    reference = {job.job_id: engine.generate_batch([job])[0].result for job in small}
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    # The process may use what it holds now plus half of what the big job needs: room for the small ones.
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + big_peak // 2) / total)
    try:
        batcher = Batcher(engine, Settings(batch_wait_ms=50, batch_max_delay_ms=500)).start()
        try:
            futures = {job.job_id: batcher.submit(job) for job in [big, *small]}
            with pytest.raises(JobFailure) as info:
                futures["big"].result(timeout=300)
            assert info.value.error.code is ErrorCode.OUT_OF_MEMORY
            for job in small:
                got = futures[job.job_id].result(timeout=300).result
                assert got.sequences[0].token_ids[:3] == reference[job.job_id].sequences[0].token_ids[:3], job.job_id
            after = batcher.submit(greedy(engine, "after", "still serving")).result(timeout=120).result
            assert len(after.sequences[0].token_ids) == 10
        finally:
            batcher.stop()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
