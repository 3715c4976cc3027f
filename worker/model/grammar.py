"""Structured output inside the decoding batch: a constrained row holds a grammar matcher (xgrammar),
whose mask of allowed tokens is applied to the row's scores after its processors and before its token
is chosen; the chosen token then advances the matcher. Rows with different grammars, and rows with
none, share one batch.

xgrammar was chosen over outlines-core (both evaluated on this CPU with the SmolLM2 and BLOOM
tokenizers; BENCHMARKS.md, Structured output): it compiles a JSON Schema in milliseconds, fills a
row's mask in microseconds, reads byte-level and SentencePiece vocabularies from the tokenizer
itself, and forks a matcher's state (beam search). It is imported on the first constrained job, so
a worker without it serves every other job.

Grammars are compiled on the task threads (``Engine.prepare``), once per constraint: compiled
grammars are cached by the constraint's hash (``Constraint.key``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from producer.constraints import Constraint
from producer.errors import ErrorCode
from worker.errors import JobFailure

log = logging.getLogger("belle.engine")

CACHED_GRAMMARS = 256


class Grammars:
    """The worker's grammar compiler and its cache of compiled grammars."""

    def __init__(self, tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._compiler = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self.compiled = self.hits = 0

    def compile(self, constraint: Constraint) -> Any:
        """The compiled grammar of ``constraint``; raises JobFailure (invalid_request) when it cannot
        be compiled, naming its request field."""
        with self._lock:
            cached = self._compiled.get(constraint.key)
            if cached is not None:
                self._compiled.move_to_end(constraint.key)
                self.hits += 1
                return cached
            compiler = self._compiler or self._start()
        started = time.perf_counter()  # outside the lock: other task threads' cache hits do not wait for it
        try:
            grammar = _compile(compiler, constraint)
        except Exception as exc:  # xgrammar raises RuntimeError (and others) with its parser's message
            raise JobFailure(ErrorCode.INVALID_REQUEST, f"{constraint.parameter} could not be compiled into a grammar: {str(exc).strip()[:500]}; "
                                                        "simplify it", parameter=constraint.parameter) from None
        with self._lock:
            self._compiled[constraint.key] = grammar
            if len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
            self.compiled += 1
            log.info("compiled a %s grammar (%s) in %.1f ms", constraint.kind, constraint.key[:12], (time.perf_counter() - started) * 1000)
            return grammar

    def _start(self):
        try:
            import xgrammar
        except ImportError:
            raise JobFailure(ErrorCode.INVALID_REQUEST, "structured output (response_format, guided_regex, guided_choice) needs xgrammar on the "
                                                        "worker: pip install 'belle-queue[structured]', or drop the constraint",
                             parameter="response_format") from None
        info = xgrammar.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size)
        # Its own cache is off (by default it keeps every grammar forever): this class keeps CACHED_GRAMMARS.
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler


def _compile(compiler, constraint: Constraint):
    # Compact JSON (no free whitespace): a weak model cannot spend its tokens on blank space.
    if constraint.kind == "json_schema":
        return compiler.compile_json_schema(constraint.source, any_whitespace=False)
    if constraint.kind == "json_object":
        return compiler.compile_json_schema(json.dumps({"type": "object"}), any_whitespace=False, strict_mode=False)
    if constraint.kind == "regex":
        return compiler.compile_regex(constraint.source)
    choices = json.loads(constraint.source)
    return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))


def new_matcher(grammar) -> Any:
    import xgrammar

    return xgrammar.GrammarMatcher(grammar)


def apply_masks(logits: torch.Tensor, rows: Sequence[int], matchers: Sequence[Any], vocab_size: int, eos_token_id: int | None) -> torch.Tensor:
    """``logits`` with every token the matchers do not allow set to -inf on their rows. A matcher that
    has ended (a beam that went on after its EOS, with a score that can no longer win) allows EOS only."""
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(rows), vocab_size)
    ended = []
    for k, matcher in enumerate(matchers):
        if matcher.is_terminated():
            ended.append(rows[k])
        else:
            matcher.fill_next_token_bitmask(bitmask, k)
    index = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
    constrained = logits[index]
    xgrammar.apply_token_bitmask_inplace(constrained, bitmask.to(logits.device))
    logits = logits.clone()
    logits[index] = constrained
    if ended:
        keep = logits[ended, eos_token_id] if eos_token_id is not None else None
        logits[ended] = float("-inf")
        if keep is not None:
            logits[ended, eos_token_id] = keep
    return logits
