"""Batched throughput against the seed's one-request-at-a-time generate(), and the cost of the queue.

  (a) the seed's way: the model as from_pretrained() loads it, one generate() per prompt (BELLE API doc
      §4.1, greedy here)
  (a') the same loop on the engine's model (fused activations): what batching alone gains is b/a'
  (b) the worker's engine and batcher, in-process (one batcher for all runs, as in a worker)
  (c) end to end: JobClient → Redis → Celery → a worker subprocess → the job records
plus (b) again with 8 distinct parameter sets over the same jobs (they share the decoding batch), and
the seed's default request, beam search (num_beams=4), on --beam-jobs jobs: (b) against (a).

Each path has one untimed warm-up run. Targets: b/a ≥ 8, c/b ≥ 0.9.
Run: .venv/bin/python -m benchmarks.throughput --runs 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from benchmarks.common import WorkerSubprocess, benchmark_model, long_prompt, machine, median_of, mixed_prompts, on_own_thread, with_long_prompts
from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.schemas import parse_request
from producer.settings import Settings, get_settings
from worker.scheduling.batcher import Batcher
from worker.model.engine import Engine
from worker.model.model_config import ModelConfig
from worker.ops.tiny_model import parameter_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-words", type=int, default=20, help="prompts have 2 to this many words (60 for long prompts)")
    parser.add_argument("--long-prompts", default="1000,1370", help="(b'') the same jobs with this many prompts replaced by prompts of these lengths (tokens)")
    parser.add_argument("--beam-jobs", type=int, default=32, help="beam search (num_beams=4) jobs; 0 leaves them out")
    parser.add_argument("--seed-beam-jobs", type=int, default=4, help="of those, how many the seed's loop runs (it is slow)")
    args = parser.parse_args()

    path = benchmark_model()
    config = ModelConfig(name="bench-bloom-50m", path=str(path), context_length=2048)
    batcher = Batcher(None, get_settings()).start(load=lambda: Engine.load(config, args.device))
    engine = batcher.engine
    prompts = mixed_prompts(args.jobs, max_words=args.max_words)
    uniform = [{"prompt": p, "num_beams": 1, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens} for p in prompts]
    # 8 parameter sets that generate the same number of tokens: they differ in repetition penalty.
    mixed = [{**r, "repetition_penalty": round(1.0 + 0.05 * (i % 8), 2)} for i, r in enumerate(uniform)]
    tokens = args.jobs * args.new_tokens
    lengths = [len(engine.tokenize(p)) for p in prompts]
    print(f"model: {path.name}, {parameter_count(path) / 1e6:.1f}M parameters; device {engine.device}; machine: {machine()}")
    print(f"{args.jobs} jobs, prompts of {min(lengths)}–{max(lengths)} tokens, {args.new_tokens} new tokens each (greedy), "
          f"batches of ≤{get_settings().batch_max_size}, medians of {args.runs} runs")

    seed_model = on_own_thread(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(engine.device).eval())
    seed_outputs: list[list[int]] = []
    gen_config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  repetition_penalty=1.2, pad_token_id=engine.pad_token_id, eos_token_id=engine.eos_token_id)

    def one_at_a_time(model, count: int = args.jobs, config: GenerationConfig = gen_config) -> float:
        """One generate() per prompt, as in the seed's generate_answer()."""
        seed_outputs.clear()
        started = time.perf_counter()
        for prompt in prompts[:count]:
            inputs = engine.tokenizer(engine.config.template.user.replace("{content}", prompt), return_tensors="pt").to(engine.device)
            with torch.inference_mode():
                out = model.generate(**inputs, generation_config=config)
            seed_outputs.append(out[0, inputs["input_ids"].shape[1]:].tolist())
        return count * args.new_tokens / (time.perf_counter() - started)

    batched_outputs: dict[str, list[int]] = {}

    def in_process(requests: list[dict]) -> float:
        jobs = [engine.prepare(f"j{i}", parse_request(r)) for i, r in enumerate(requests)]
        started = time.perf_counter()
        futures = [batcher.submit(job) for job in jobs]
        results = [f.result() for f in futures]
        seconds = time.perf_counter() - started
        batched_outputs.update({g.job_id: g.result.sequences[0].token_ids for g in results})
        return len(requests) * args.new_tokens / seconds

    on_own_thread(lambda: one_at_a_time(seed_model, 4))
    a_fused = median_of(args.runs, lambda: on_own_thread(lambda: one_at_a_time(engine.model)))
    a = median_of(args.runs, lambda: on_own_thread(lambda: one_at_a_time(seed_model)))
    in_process(uniform)
    b = median_of(args.runs, lambda: in_process(uniform))
    identical = sum(seed_outputs[i] == batched_outputs[f"j{i}"] for i in range(args.jobs))
    b_mixed = median_of(args.runs, lambda: in_process(mixed))
    # (b'') a few long prompts among them: alternating with (b), each run with the prefix cache emptied first.
    lengths = [int(x) for x in args.long_prompts.split(",") if x]
    skewed_prompts = with_long_prompts(prompts, [long_prompt(lambda t: len(engine.tokenize(t)), n, seed=100 + k) for k, n in enumerate(lengths)])
    skewed = [{**r, "prompt": p} for r, p in zip(uniform, skewed_prompts, strict=True)]
    prefixes = batcher._batch.prefixes

    def fresh(requests: list[dict]) -> float:
        if prefixes is not None:
            prefixes.clear()
        return in_process(requests)

    pairs = [(fresh(uniform), fresh(skewed)) for _ in range(args.runs)] if lengths else []
    beams = [{**r, "num_beams": 4} for r in uniform[:args.beam_jobs]]
    if beams:
        beam_config = copy.deepcopy(gen_config)
        beam_config.num_beams = 4
        a_beam = median_of(args.runs, lambda: on_own_thread(lambda: one_at_a_time(seed_model, min(args.seed_beam_jobs, len(beams)), beam_config)))
        in_process(beams)
        b_beam = median_of(args.runs, lambda: in_process(beams))
    batcher.stop()

    with EmbeddedRedis(ephemeral=True) as server:
        settings = Settings(redis_url=server.url)
        worker = WorkerSubprocess(server.url, path, device=args.device)
        with JobClient(settings) as client:
            worker.wait_ready(client)

            def through_queue() -> float:
                started = time.perf_counter()
                ids = [client.submit(r) for r in uniform]
                records = [client.wait(job_id, 600) for job_id in ids]
                seconds = time.perf_counter() - started
                assert all(r.result is not None for r in records), [r.error for r in records if r.error]
                return tokens / seconds

            through_queue()
            c = median_of(args.runs, through_queue)
        log = worker.stop()
    join_lines = [line.split("belle.batcher: ")[1] for line in log.splitlines() if "belle.batcher: batch:" in line]

    print(f"\n(a) one generate() per prompt   {a:10.1f} tokens/s")
    print(f"(a') the same, engine's model    {a_fused:10.1f} tokens/s")
    print(f"(b) batched engine, in-process   {b:10.1f} tokens/s   b/a = {b / a:.2f}   (target ≥ 8)   b/a' = {b / a_fused:.2f} (batching alone)")
    print(f"(c) through Redis + Celery       {c:10.1f} tokens/s   c/b = {c / b:.2f}   (target ≥ 0.9)")
    print(f"(b') 8 parameter sets, in-process {b_mixed:9.1f} tokens/s   mixed/uniform = {b_mixed / b:.2f}")
    if pairs:
        u, k = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        print(f"(b'') {len(lengths)} prompts of {args.long_prompts} tokens among them (prefix cache emptied before each run): {k:.1f} tokens/s "
              f"against {u:.1f} alternating; skewed/uniform = {k / u:.2f}")
    if beams:
        print(f"beam search (num_beams=4), {len(beams)} jobs: (a) {a_beam:.1f} tokens/s, (b) {b_beam:.1f} tokens/s, b/a = {b_beam / a_beam:.2f}")
    print(f"greedy outputs identical between the seed's model (a) and the batched engine (b): {identical}/{args.jobs}")
    print(f"worker joins in the last queued run ({len(join_lines) // (args.runs + 1)} per run on average): " + "; ".join(join_lines[-3:]))


if __name__ == "__main__":
    main()
