"""The resident model: loaded once per worker process, on the thread that runs it.

Two ways to run jobs:
- greedy, sampling and beam search jobs go through ``forward``, one model call per step of a
  continuous decoding batch (worker/model/decoding.py) that jobs join and leave between steps;
- beam sampling jobs (``do_sample`` with ``num_beams`` > 1) go through transformers' ``generate()``
  (``generate_batch``), one call per group of jobs that share a generation config (``batch_key``);
  ``generate_batch`` is also the reference the decoding batch is tested against.
Both build their results with ``job_result``. Loading ends with a two-token warm-up generation
(worker/model/warmup.py): a model that loads but cannot generate is refused there.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, StoppingCriteriaList

from producer.errors import ErrorCode
from producer.records import FinishReason, JobResult, PromptFit, SequenceResult, StreamChunk, Timings, Usage
from producer.schemas import GenerationRequest, Message
from worker.costs import tokens_held
from worker.errors import JobFailure
from worker.model import lane_attention
from worker.model.fused_ops import fuse_activations
from worker.model.grammar import Grammars
from worker.model.import_noise import quiet_optional_kernels
from worker.model.model_config import ModelConfig, Quantization
from worker.model.packaged_model import prepare
from worker.model.prompting import fit_prompt, render
from worker.model.warmup import warm_up
from worker.model.detokenize import JobStream, RowMonitor, cut_at_stop

log = logging.getLogger("belle.engine")

transformers.utils.logging.disable_progress_bar()
quiet_optional_kernels()  # before peft or transformers import bitsandbytes

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PreparedJob:
    """A job whose prompt is tokenized and fitted to the context window."""

    job_id: str
    request: GenerationRequest
    input_ids: list[int]
    max_new_tokens: int
    fit: PromptFit
    queued_s: float = 0.0
    attempt: int = 1
    prepared_at: float = field(default_factory=time.perf_counter)  # at the start of its attempt, once tokenized
    grammar: Any = None  # its structured output's compiled grammar (worker/model/grammar.py), or None


@dataclass(frozen=True)
class Generated:
    job_id: str
    result: JobResult
    cancelled: bool = False  # stopped early on request; the result holds the partial text
    final_chunks: list[StreamChunk] = field(default_factory=list)  # a streaming job's last chunks, to publish before its end


@dataclass(frozen=True)
class RawSequence:
    """One generated sequence as it came out: tokens (EOS and padding included), and per token the
    log-probability (output_scores) or, for beam search, the sequence's score."""

    token_ids: list[int]
    logprobs: list[float] | None = None
    score: float | None = None


def batch_cost(jobs: Sequence[PreparedJob]) -> int:
    """Tokens a batch holds at its longest: rows × (longest prompt + max_new_tokens), where a job has
    one row per beam (beam search) or per returned sequence (sampling)."""
    return tokens_held(sum(max(j.request.num_beams, j.request.num_return_sequences) for j in jobs), max(len(j.input_ids) for j in jobs),
                       max(j.max_new_tokens for j in jobs))


BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


def bitsandbytes_config(quantization: Quantization, device: torch.device):
    from transformers import BitsAndBytesConfig

    _require("bitsandbytes", "quantization", "quant")
    if quantization.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = _DTYPES[quantization.compute_dtype] if device.type == "cuda" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute, bnb_4bit_quant_type=quantization.quant_type,
                              bnb_4bit_use_double_quant=quantization.double_quant)


def attach_adapters(model, adapters: dict[str, str]):
    """The model wrapped by peft with every adapter loaded (none merged, so rows of one batch can use
    different adapters). peft is imported only here: it pulls in bitsandbytes, which takes seconds."""
    _require("peft", "adapters", "lora")
    from peft import PeftModel

    (first, path), *rest = adapters.items()
    model = PeftModel.from_pretrained(model, path, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    return model


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """generate() draws from torch's global generator: seed it for a seeded job, and put back its
    state after, so that a job's seed does not change what other jobs draw."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _require(module: str, setting: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise RuntimeError(f"the model config sets `{setting}`, which needs {module}: pip install 'belle-queue[{extra}]'")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device (check CUDA_VISIBLE_DEVICES and the torch build)")
    return torch.device(device)


class Engine:
    """``tokenizer`` belongs to the thread that generates; ``tokenize`` may be called from any thread
    (it uses its own copy of the tokenizer under a lock: fast tokenizers are not thread-safe)."""

    def __init__(self, model, tokenizer, config: ModelConfig, device: torch.device, *, fault_memory_budget_tokens: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.fault_memory_budget_tokens = fault_memory_budget_tokens
        self._encoder = copy.deepcopy(tokenizer)
        self._encoder_lock = threading.Lock()
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.num_layers = model.config.num_hidden_layers
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.has_adapters = bool(config.adapters)
        base = model.get_base_model() if self.has_adapters else model
        accepted = inspect.signature(base.forward).parameters
        self._cache_argument = "cache" if "cache" in accepted else "past_key_values"  # renamed during transformers 5.x
        self._takes_position_ids = "position_ids" in accepted  # rotary models need them with left padding
        self._takes_logits_to_keep = "logits_to_keep" in accepted
        self.grammars = Grammars(copy.deepcopy(tokenizer), self.vocab_size)
        self.lane_attention = lane_attention.supported(model)  # one model call serves every lane of a step

    @classmethod
    def load(cls, config: ModelConfig, device: str = "auto", *, fault_memory_budget_tokens: int | None = None) -> Engine:
        target = resolve_device(device)
        dtype = _DTYPES.get(config.dtype, "auto")
        if target.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            log.info("model %s asks for %s; using float32 on CPU", config.name, config.dtype)
            dtype = torch.float32
        if config.source is not None:
            prepare(config.source, config.path)
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(config.path)
        quantization = config.quantization
        if quantization.mode == "none":
            model = AutoModelForCausalLM.from_pretrained(config.path, dtype=dtype)
            model.to(target)
        else:
            if quantization.mode == "8bit":
                # On every 8-bit matrix product outside float16 (so at every step on CPU), bitsandbytes
                # logs that it casts; once is enough.
                logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
                log.info("8-bit weights: bitsandbytes computes in float16 (inputs are cast)")
            # Quantised weights are placed while loading and cannot be moved afterwards.
            place = {"": target.index or 0} if target.type == "cuda" else {"": "cpu"}
            model = AutoModelForCausalLM.from_pretrained(config.path, dtype=dtype, quantization_config=bitsandbytes_config(quantization, target), device_map=place)
        fused = fuse_activations(model)
        if config.adapters:
            model = attach_adapters(model, config.adapters)
        model.eval()
        log.info("loaded %s from %s on %s (%s, %s weights, %.1f MB, %d activations fused, adapters: %s) in %.1f s", config.name, config.path, target,
                 model.dtype, quantization.mode, model.get_memory_footprint() / 1e6, fused, ", ".join(config.adapters) or "none", time.perf_counter() - started)
        engine = cls(model, tokenizer, config, target, fault_memory_budget_tokens=fault_memory_budget_tokens)
        warm_up(engine)  # a model that loads but cannot generate stops here, before the worker announces itself
        return engine

    # --- preparing jobs ---

    def tokenize(self, text: str) -> list[int]:
        with self._encoder_lock:
            return self._encoder(text, add_special_tokens=True)["input_ids"]

    def encode(self, messages: list[Message]) -> list[int]:
        """Prompt tokens of ``messages``: the config's template, or the tokenizer's own chat template
        (which writes its special tokens itself) ending with the assistant's turn."""
        if self.config.template != "tokenizer":
            return self.tokenize(render(messages, self.config.template))
        with self._encoder_lock:
            text = self._encoder.apply_chat_template([{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True,
                                                     tokenize=False)
            return self._encoder(text, add_special_tokens=False)["input_ids"]

    @property
    def adapters(self) -> list[str]:
        """The adapters this engine serves (its model config's allowlist)."""
        return sorted(self.config.adapters)

    def prepare(self, job_id: str, request: GenerationRequest, queued_s: float = 0.0, attempt: int = 1) -> PreparedJob:
        """Fit the prompt to the context window; raises JobFailure when this job cannot run here."""
        if request.adapter is not None and request.adapter not in self.config.adapters:
            raise JobFailure(ErrorCode.INVALID_REQUEST, f"adapter must be one of the adapters this worker serves ({self.adapters}), got {request.adapter!r}; "
                             "pick one of those or drop adapter", parameter="adapter")
        fitted = fit_prompt(request, self.encode, self.config.context_length)
        constraint = request.constraint
        grammar = self.grammars.compile(constraint) if constraint is not None else None
        return PreparedJob(job_id, request, fitted.input_ids, fitted.max_new_tokens, fitted.fit, queued_s, attempt, grammar=grammar)

    @staticmethod
    def batch_key(job: PreparedJob) -> tuple:
        """Jobs with equal keys can share one generate() call."""
        r = job.request
        sampling = (r.temperature, r.top_p, r.top_k) if r.do_sample else None
        # A seeded sampling job runs alone: its random stream must not depend on its neighbours.
        alone = job.job_id if (r.do_sample and r.seed is not None) else None
        # Adapters are not in the key: peft runs rows with different adapters in one call.
        return (r.do_sample, r.num_beams, r.num_return_sequences, job.max_new_tokens, r.min_new_tokens, sampling,
                r.repetition_penalty, r.no_repeat_ngram_size, r.output_scores, tuple(r.stop), r.length_penalty, r.early_stopping, alone)

    @staticmethod
    def decodes_stepwise(job: PreparedJob) -> bool:
        """Whether the job runs in the continuous decoding batch: greedy, sampling and beam search; beam
        sampling (``do_sample`` with beams) runs through generate()."""
        return job.request.num_beams == 1 or not job.request.do_sample

    # --- generating ---

    def check_memory(self, cost: int, what: str) -> None:
        """Fault injection (BELLE_FAULT_MEMORY_BUDGET_TOKENS): a real OutOfMemoryError for work over budget."""
        if self.fault_memory_budget_tokens is not None and cost > self.fault_memory_budget_tokens:
            raise torch.OutOfMemoryError(f"simulated: {what} costing {cost} tokens exceeds BELLE_FAULT_MEMORY_BUDGET_TOKENS={self.fault_memory_budget_tokens}")

    def adapter_names(self, adapters: Sequence[str | None]) -> dict:
        """The keyword that makes peft run each row with its own adapter (none: the base model)."""
        return {"adapter_names": [a or BASE_ADAPTER for a in adapters]} if self.has_adapters else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, adapters: Sequence[str | None], *,
                cost: int | None = None) -> torch.Tensor:
        """One model call over left-padded rows that continue ``cache``: the next-token logits of
        every row (float32). ``attention_mask`` covers the cached columns and the new ones;
        ``adapters``: each row's adapter."""
        if cost is not None:
            self.check_memory(cost, f"a decoding step of {input_ids.shape[0]} rows")
        kwargs = {self._cache_argument: cache, "use_cache": True, **self.adapter_names(adapters)}
        if self._takes_position_ids:
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode():
            output = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return output.logits[:, -1].float()

    def forward_lanes(self, input_ids: torch.Tensor, position_ids: torch.Tensor, step: lane_attention.LanesStep,
                      adapters: Sequence[str | None]) -> torch.Tensor:
        """One decoding step of every lane in one model call: each row's next-token logits (float32).
        ``input_ids``: each row's last token, lane after lane; ``position_ids``: their positions."""
        kwargs = {self._cache_argument: lane_attention.StepCache(step, self.num_layers), "use_cache": True, "lanes": step,
                  **self.adapter_names(adapters)}
        if self._takes_position_ids:
            kwargs["position_ids"] = position_ids
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode(), lane_attention.lanes_attention(self.model):
            output = self.model(input_ids=input_ids, attention_mask=None, **kwargs)
        return output.logits[:, -1].float()

    def generate_batch(self, jobs: Sequence[PreparedJob], is_cancelled: Callable[[str], bool] | None = None, *, held: int = 0) -> list[Generated]:
        """One generate() call for jobs that share a batch key: the path of beam sampling, and the
        reference the decoding batch is tested against. With ``is_cancelled``, a cancelled job's rows
        stop at the next step. ``held``: the cost of what else holds memory (the decoding batch)."""
        first = jobs[0].request
        self.check_memory(batch_cost(jobs) + held, f"a batch of {len(jobs)}" + (f" beside a decoding batch costing {held}" if held else ""))
        width = max(len(job.input_ids) for job in jobs)
        input_ids = torch.full((len(jobs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(job.input_ids):] = torch.tensor(job.input_ids, dtype=torch.long)
            attention_mask[row, width - len(job.input_ids):] = 1
        config = self.generation_config(first, jobs[0].max_new_tokens)
        monitor = None
        if is_cancelled is not None or first.stop:
            monitor = RowMonitor([job.job_id for job in jobs], width, is_cancelled, first.stop, self.decode, beam_search=first.num_beams > 1)
        started = time.perf_counter()
        with torch.inference_mode(), _seeded(first.seed, self.device):
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([monitor]) if monitor is not None else None,
                # generate() expands every input to num_beams rows (beam search) or num_return_sequences.
                **self.adapter_names([job.request.adapter for job in jobs for _ in range(first.num_beams if first.num_beams > 1 else first.num_return_sequences)]),
            )
        seconds = time.perf_counter() - started
        generated = output.sequences[:, width:].cpu()
        logprobs = self._logprobs(output) if first.output_scores else None
        beam_scores = output.sequences_scores.float().cpu() if first.num_beams > 1 else None
        n = first.num_return_sequences
        results = []
        for i, job in enumerate(jobs):
            cancelled = monitor is not None and job.job_id in monitor.cancelled_jobs
            sequences = []
            for k in range(n):
                row = i * n + k
                token_ids = generated[row].tolist()
                if cancelled and row in monitor.cancelled_rows:
                    token_ids = token_ids[: monitor.cancelled_rows[row]]
                sequences.append(RawSequence(token_ids, logprobs[row].tolist() if logprobs is not None else None,
                                             float(beam_scores[row]) if beam_scores is not None else None))
            results.append(self.job_result(job, sequences, generation_s=seconds, batch_size=len(jobs), cancelled=cancelled,
                                           admission_s=started - job.prepared_at))
        return results

    def job_result(self, job: PreparedJob, sequences: Sequence[RawSequence], *, generation_s: float, batch_size: int, cancelled: bool = False,
                   stream: JobStream | None = None, admission_s: float | None = None, first_token_s: float | None = None) -> Generated:
        """The job's result from its sequences' generated tokens. A streaming job's last chunks (text
        held back until the end) are left in ``Generated.final_chunks``."""
        results = [self._sequence(k, s, job, cancelled=cancelled) for k, s in enumerate(sequences)]
        final_chunks = []
        if stream is not None:
            for sequence in results:
                if chunk := stream.advance(sequence.result.index, sequence.result.text, len(sequence.result.token_ids), final=True):
                    final_chunks.append(chunk)
        completion = sum(s.completion_tokens for s in results)
        return Generated(job.job_id, JobResult(
            sequences=[s.result for s in results],
            usage=Usage(prompt_tokens=len(job.input_ids), completion_tokens=completion, total_tokens=len(job.input_ids) + completion),
            timings=Timings(queued_s=round(job.queued_s, 6), generation_s=round(generation_s, 6), batch_size=batch_size,
                            admission_s=None if admission_s is None else round(admission_s, 6),
                            first_token_s=None if first_token_s is None else round(first_token_s, 6)),
            model=self.config.name,
            adapter=job.request.adapter,
            prompt_fit=job.fit,
        ), cancelled=cancelled, final_chunks=final_chunks)

    def generation_config(self, request: GenerationRequest, max_new_tokens: int) -> GenerationConfig:
        sampling = {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k} if request.do_sample else {"temperature": None, "top_p": None, "top_k": None}
        return GenerationConfig(
            do_sample=request.do_sample,
            num_beams=request.num_beams,
            num_return_sequences=request.num_return_sequences,
            max_new_tokens=max_new_tokens,
            min_new_tokens=request.min_new_tokens,
            repetition_penalty=request.repetition_penalty,
            no_repeat_ngram_size=request.no_repeat_ngram_size,
            length_penalty=request.length_penalty,
            early_stopping=request.early_stopping,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            return_dict_in_generate=True,
            # Beam search only reports its sequence scores together with the per-step scores.
            output_scores=request.output_scores or request.num_beams > 1,
            **sampling,
        )

    def _logprobs(self, output) -> torch.Tensor:
        beam_indices = getattr(output, "beam_indices", None)
        # Beam scores are already log-probabilities; greedy/sampling scores are processed logits.
        scores = self.model.compute_transition_scores(output.sequences, output.scores, beam_indices, normalize_logits=beam_indices is None)
        return scores.float().cpu()

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _sequence(self, index: int, raw: RawSequence, job: PreparedJob, *, cancelled: bool = False) -> _Sequence:
        token_ids = list(raw.token_ids)
        finish = FinishReason.LENGTH
        if self.eos_token_id is not None and self.eos_token_id in token_ids:
            token_ids = token_ids[: token_ids.index(self.eos_token_id)]
            finish = FinishReason.EOS
        else:
            while token_ids and token_ids[-1] == self.pad_token_id:
                token_ids.pop()
        text = self.decode(token_ids)
        if job.request.stop:
            # Before EOS: a sequence that generate() ended on a stop string is padded after it, and its
            # padding may be EOS; a sequence the model ended itself never holds one (it would have
            # stopped there).
            text, matched = cut_at_stop(text, job.request.stop)
            if matched:
                finish = FinishReason.STOP
        computed = len(token_ids) + (finish is FinishReason.EOS)  # the EOS the model generated counts
        if cancelled and finish is FinishReason.LENGTH:
            finish = FinishReason.CANCELLED
        values = [round(float(v), 5) for v in raw.logprobs[: len(token_ids)]] if raw.logprobs is not None else None
        tokens = [self.decode([t]) for t in token_ids[: len(values)]] if values is not None else None
        return _Sequence(SequenceResult(index=index, text=text, token_ids=token_ids, finish_reason=finish, score=raw.score, logprobs=values,
                                        tokens=tokens), computed)


@dataclass(frozen=True)
class _Sequence:
    result: SequenceResult
    completion_tokens: int
