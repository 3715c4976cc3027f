"""OpenAI's request and response shapes, mapped to and from belle-queue's job contract.

One mapping serves the OpenAI batch lines (producer/batches.py) and the HTTP gateway's
`/v1/chat/completions` and `/v1/completions` (producer/gateway/): ``max_tokens`` →
``max_new_tokens``, ``n`` → ``num_return_sequences``, ``logprobs`` → ``output_scores``, ``temperature``
0 → greedy, with OpenAI's defaults (sampling at temperature 1); BELLE's own parameters (``top_k``,
``repetition_penalty``, ``num_beams``, ...) pass as extra body fields; anything else OpenAI defines that
has no equivalent is refused by name, never silently ignored. Responses are built from job records
and stream events here too, so that "what does field X become" has one answer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from producer.errors import InvalidRequestError
from producer.records import FinishReason, JobResult

# What maps, what is dropped, what only its neutral value passes.
OPENAI_URLS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}
OPENAI_RENAMED = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "n": "num_return_sequences", "top_p": "top_p",
                  "stop": "stop", "seed": "seed", "metadata": "metadata", "response_format": "response_format"}
OPENAI_DROPPED = {"model", "user", "store", "service_tier"}  # the workers serve their own model (the gateway checks it is served)
OPENAI_NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "top_logprobs": 0, "stream": False, "echo": False, "best_of": 1,
                  "stream_options": None, "parallel_tool_calls": None}
OPENAI_DEFAULTS = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "num_beams": 1}
# belle-queue's own parameters, accepted as extra body fields under their own names.
BELLE_FIELDS = ("top_k", "repetition_penalty", "num_beams", "length_penalty", "early_stopping", "guided_regex", "guided_choice", "no_repeat_ngram_size", "min_new_tokens", "do_sample", "preset", "deadline",
                "adapter", "idempotency_key")
# What a job's finish reason is called by OpenAI.
FINISH_REASONS = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "stop"}


def openai_request(line: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI batch line's body as request fields; raises InvalidRequestError for what cannot map."""
    extra = sorted(set(line) - {"method", "url", "body"})
    if extra:
        raise InvalidRequestError.single(extra[0], None, f"{extra[0]} is not a field of an OpenAI batch line (custom_id, method, url, body)")
    if line.get("method", "POST") != "POST":
        raise InvalidRequestError.single("method", line.get("method"), f"method must be POST, got {line.get('method')!r}")
    url = line.get("url")
    if url not in OPENAI_URLS:
        raise InvalidRequestError.single("url", url, f"url must be one of {sorted(OPENAI_URLS)}, got {url!r}")
    return body_fields(url, line.get("body"), where="body.")


def body_fields(url: str, body: Any, *, where: str = "", streaming: bool = False) -> dict[str, Any]:
    """An OpenAI request body for ``url`` as request fields (``stream``, and ``stream_options`` too when
    ``streaming`` is allowed); InvalidRequestError naming the field (prefixed with ``where``) for what
    cannot map."""
    if not isinstance(body, Mapping):
        raise InvalidRequestError.single(where.rstrip(".") or "body", None, f"{where.rstrip('.') or 'the body'} must be a JSON object")
    out: dict[str, Any] = {}
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise InvalidRequestError.single(f"{where}max_completion_tokens", None, "both max_tokens and max_completion_tokens are set; keep one")
    for name, value in body.items():
        field = f"{where}{name}"
        if value is None and name not in ("messages", "prompt"):
            continue  # OpenAI reads null as "the default"
        if name in ("messages", "prompt"):
            if OPENAI_URLS[url] != name:
                raise InvalidRequestError.single(field, None, f"{field} does not go with {url} (it takes {OPENAI_URLS[url]})")
            out[name] = _messages(value, where) if name == "messages" else _prompt(value, where)
        elif name == "temperature":
            if value == 0:
                out.update(do_sample=False)
            else:
                out.update(do_sample=True, temperature=value)
        elif name == "logprobs":
            if OPENAI_URLS[url] == "prompt" and (isinstance(value, bool) or not isinstance(value, int) or value != 0):
                # (completions: the number of alternatives per token; only each chosen token's own is given)
                raise InvalidRequestError.single(field, value, f"{field} must be 0 here (the chosen tokens' log-probabilities; "
                                                               "alternatives are not given), got {value!r}")
            if OPENAI_URLS[url] == "messages" and not isinstance(value, bool):
                raise InvalidRequestError.single(field, value, f"{field} must be true or false, got {value!r}")
            out["output_scores"] = value is True or OPENAI_URLS[url] == "prompt"
        elif streaming and name == "stream":
            out["stream"] = value
        elif streaming and name == "stream_options":
            if not isinstance(value, Mapping) or set(value) - {"include_usage"}:
                raise InvalidRequestError.single(field, None, f"{field} may hold include_usage only")
        elif name in OPENAI_RENAMED:
            out[OPENAI_RENAMED[name]] = value
        elif name in BELLE_FIELDS:
            out[name] = value
        elif name in OPENAI_DROPPED:
            continue
        elif name in OPENAI_NEUTRAL:
            if value != OPENAI_NEUTRAL[name]:
                hint = "; repetition_penalty is the nearest" if name.endswith("_penalty") else ""
                raise InvalidRequestError.single(field, value, f"{field} is not supported here (only {OPENAI_NEUTRAL[name]!r}), got {value!r}{hint}")
        else:
            raise InvalidRequestError.single(field, None, f"{field} is not supported here; remove it")
    if out.get("do_sample") is False:
        out.setdefault("num_beams", 1)
    return out


def openai_job_fields(mapped: Mapping[str, Any], presets: Mapping[str, Mapping[str, Any]], defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The request fields of a mapped OpenAI body: OpenAI's defaults, then a preset (the body's, else the
    defaults'), then ``defaults``, then the body's own fields."""
    defaults = dict(defaults or {})
    name = mapped.get("preset", defaults.get("preset"))
    if name is not None and (not isinstance(name, str) or name not in presets):
        raise InvalidRequestError.single("preset", name, f"preset must be one of {sorted(presets)}, got {name!r}")
    fields = {**OPENAI_DEFAULTS, **(presets[name] if name else {}), **{k: v for k, v in defaults.items() if k != "preset"},
              **{k: v for k, v in mapped.items() if k != "preset"}}
    return fields


def _messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise InvalidRequestError.single(f"{where}messages", None, f"{where}messages must be a list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError.single(f"{where}messages[{i}]", None, f"{where}messages[{i}] must be an object")
        role = {"developer": "system"}.get(message.get("role"), message.get("role"))
        if role not in ("system", "user", "assistant"):
            raise InvalidRequestError.single(f"{where}messages[{i}].role", role,
                                             f"{where}messages[{i}].role must be system, developer, user or assistant, got {role!r}")
        unknown = sorted(set(message) - {"role", "content"})
        if unknown:
            raise InvalidRequestError.single(f"{where}messages[{i}].{unknown[0]}", None, f"{where}messages[{i}].{unknown[0]} is not supported here; remove it")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise InvalidRequestError.single(f"{where}messages[{i}].content", None, f"{where}messages[{i}].content may hold text parts only")
            content = "".join(p["text"] for p in content)
        out.append({"role": role, "content": content})
    return out


def _prompt(prompt: Any, where: str) -> Any:
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        raise InvalidRequestError.single(f"{where}prompt", None, f"{where}prompt must be one string, not a list (one prompt per job)")
    return prompt


# --- responses ---


def _logprobs(sequence, chat: bool) -> dict[str, Any] | None:
    """Per-token log-probabilities as OpenAI shapes them: each token's text as the worker decoded it
    alone (``token_id`` too), and no alternatives (``top_logprobs`` is refused above 0)."""
    if sequence.logprobs is None:
        return None
    count = len(sequence.logprobs)
    texts = list(sequence.tokens or [])[:count] + [""] * (count - len(sequence.tokens or []))
    if chat:
        return {"content": [{"token": text, "token_id": t, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []}
                            for text, t, lp in zip(texts, sequence.token_ids, sequence.logprobs, strict=False)]}
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_ids": sequence.token_ids[:count], "token_logprobs": sequence.logprobs, "top_logprobs": None,
            "text_offset": offsets}


def usage(result: JobResult) -> dict[str, int]:
    return result.usage.model_dump()


def completion(job_id: str, result: JobResult, created: float | None, *, chat: bool, model: str) -> dict[str, Any]:
    """The OpenAI response body of a job that ended with a result (``id`` is the job id)."""
    choices = []
    for sequence in result.sequences:
        choice: dict[str, Any] = {"index": sequence.index, "finish_reason": FINISH_REASONS[sequence.finish_reason],
                                  "logprobs": _logprobs(sequence, chat)}
        if chat:
            choice["message"] = {"role": "assistant", "content": sequence.text}
        else:
            choice["text"] = sequence.text
        choices.append(choice)
    return {"id": job_id, "object": "chat.completion" if chat else "text_completion", "created": int(created or time.time()),
            "model": result.model or model, "choices": choices, "usage": usage(result), "system_fingerprint": None}


def chunk(job_id: str, created: int, model: str, *, chat: bool, index: int, text: str | None = None, first: bool = False,
          finish_reason: str | None = None) -> dict[str, Any]:
    """One streamed chunk: text for a choice, or its end (``finish_reason``)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    return {"id": job_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created, "model": model,
            "choices": [choice], "system_fingerprint": None}


def usage_chunk(job_id: str, created: int, model: str, result: JobResult, *, chat: bool) -> dict[str, Any]:
    """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": job_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created, "model": model, "choices": [],
            "usage": usage(result), "system_fingerprint": None}
