"""Structured output: what constraining half a decoding batch costs, and what compiling a grammar costs.

On SmolLM2-135M-Instruct (the real tokenizer: 49,152 tokens per mask), in one run:
  - tokens/s of --jobs greedy jobs × --new-tokens tokens with no constraint, and with half of them held
    to a JSON Schema (a long string field, so that they too run to --new-tokens), medians of --runs;
  - compile time of each schema of tests/test_real_model.py, on first use and cached, and the time to
    fill one row's mask;
  - with --outlines (when outlines-core is installed): the same schemas through outlines-core
    (vocabulary, index and per-step allowed-token lookups), the library not chosen.

Target: half constrained / none ≥ 0.8.
Run: .venv/bin/python -m benchmarks.structured --runs 3
"""

from __future__ import annotations

import argparse
import json
import time
from statistics import median

from benchmarks.common import machine
from producer.constraints import constraint_of
from producer.schemas import parse_request
from producer.settings import get_settings
from tests.test_real_model import STRUCTURED
from worker.model.engine import Engine
from worker.model.grammar import Grammars, new_matcher
from worker.model.model_config import load_model_config
from worker.model.packaged_model import prepare
from worker.scheduling.batcher import Batcher

LONG = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 400}}, "required": ["answer"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--outlines", action="store_true", help="also time outlines-core on the same schemas")
    args = parser.parse_args()
    settings = get_settings()
    config = load_model_config("smollm2-135m", settings)
    prepare(config.source, config.path)
    config = config.model_copy(update={"source": None})
    batcher = Batcher(None, settings).start(load=lambda: Engine.load(config, "cpu"))
    engine = batcher.engine
    n = args.new_tokens
    print(f"model: {config.name}; machine: {machine()}")
    print(f"{args.jobs} greedy jobs × {n} new tokens; half constrained to a JSON Schema (a string of ≥ 400 characters) or none; medians of {args.runs}")

    def requests(constrained: bool) -> list[dict]:
        out = []
        for i in range(args.jobs):
            request = {"prompt": f"Question {i}: tell me about the sea.", "num_beams": 1, "max_new_tokens": n, "min_new_tokens": n}
            if constrained and i % 2:
                request = {**request, "min_new_tokens": 1,
                           "response_format": {"type": "json_schema", "json_schema": {"name": "long", "schema": LONG}}}
            out.append(request)
        return out

    def rate(reqs: list[dict]) -> float:
        jobs = [engine.prepare(f"j{i}", parse_request(r)) for i, r in enumerate(reqs)]
        started = time.perf_counter()
        results = [f.result() for f in [batcher.submit(job) for job in jobs]]
        seconds = time.perf_counter() - started
        return sum(len(s.token_ids) for g in results for s in g.result.sequences) / seconds

    free, half = requests(False), requests(True)
    rate(free)
    rate(half)
    free_rates, half_rates = [], []
    for _ in range(args.runs):
        free_rates.append(rate(free))
        half_rates.append(rate(half))
    batcher.stop()
    print(f"\nno constraint        {median(free_rates):8.1f} tokens/s")
    print(f"half constrained     {median(half_rates):8.1f} tokens/s   half / none = {median(half_rates) / median(free_rates):.2f} (target ≥ 0.8)")

    grammars = Grammars(engine.tokenizer, engine.vocab_size)
    started = time.perf_counter()
    grammars.compile(constraint_of({"type": "json_object"}, None, None))
    print(f"\nxgrammar: tokenizer read and the first (json_object) grammar: {(time.perf_counter() - started) * 1000:.0f} ms")
    import xgrammar

    for name, schema in STRUCTURED.items():
        constraint = constraint_of({"type": "json_schema", "json_schema": {"name": name, "schema": schema}}, None, None)
        started = time.perf_counter()
        grammar = grammars.compile(constraint)
        first = time.perf_counter() - started
        started = time.perf_counter()
        grammars.compile(constraint)
        cached = time.perf_counter() - started
        matcher = new_matcher(grammar)
        bitmask = xgrammar.allocate_token_bitmask(1, engine.vocab_size)
        started = time.perf_counter()
        for _ in range(1000):
            matcher.fill_next_token_bitmask(bitmask, 0)
        fill = (time.perf_counter() - started) / 1000
        print(f"schema {name:8} compile {first * 1000:7.2f} ms first, {cached * 1000:6.3f} ms cached; one row's mask {fill * 1e6:6.1f} µs")

    if args.outlines:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        started = time.perf_counter()
        tokens: dict[str, list[int]] = {}
        for token, i in engine.tokenizer.get_vocab().items():
            if i != engine.eos_token_id:
                tokens.setdefault(token, []).append(i)
        vocabulary = Vocabulary(engine.eos_token_id, tokens)
        print(f"\noutlines-core: vocabulary {(time.perf_counter() - started) * 1000:.0f} ms (token strings as the tokenizer stores them; "
              "byte-level ones need mapping back to bytes first)")
        for name, schema in STRUCTURED.items():
            started = time.perf_counter()
            index = Index(build_regex_from_schema(json.dumps(schema)), vocabulary)
            built = time.perf_counter() - started
            guide = Guide(index)
            started = time.perf_counter()
            for _ in range(1000):
                guide.get_tokens()
            print(f"schema {name:8} index {built * 1000:7.1f} ms; one row's allowed tokens {(time.perf_counter() - started) / 1000 * 1e6:6.1f} µs "
                  "(a list of ids, to turn into a mask)")


if __name__ == "__main__":
    main()
