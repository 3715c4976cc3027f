"""The job request: every generation parameter with its range and default (seed §3.1), named as in
transformers' ``GenerationConfig``, plus the job-level fields. ``parse_request`` is the one way in:
it applies the preset, validates, and turns every problem into an ``InvalidRequestError`` whose
message names the parameter, the value and the fix.

Defaults resolve in this order: explicit field → preset → built-in default below, where ``num_beams``'s
built-in default is 4, and 1 for a streamed request (``stream``: beam search cannot stream).
"""

from __future__ import annotations

import difflib
import json
import math
import re
import reprlib
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from annotated_types import Ge, Le
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from producer.constraints import Constraint, ConstraintProblem, check_choices, check_regex, check_response_format, constraint_of
from producer.errors import InvalidRequestError, ParameterProblem
from producer.settings import Settings


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


_Text = Annotated[str, Field(description="Unicode text")]

# An adapter is asked for by name; the worker maps names to folders from its model config.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class GenerationRequest(BaseModel):
    """A validated generation job. Build it with ``parse_request``, not directly."""

    # NaN and infinities are refused: they are not JSON, and no parameter means anything with them.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    # --- what to answer ---
    prompt: _Text | None = Field(None, description="A single user turn; the worker applies the model's template.")
    messages: list[Message] | None = Field(None, description="Multi-turn history, oldest first, ending with a user turn.")
    preset: str | None = Field(None, description="Named parameter set from configs/presets.yaml; explicit fields override it.")

    # --- decoding strategy (seed §3.2) ---
    do_sample: bool = Field(False, description="Sample from the distribution instead of greedy/beam search.")
    num_beams: int = Field(4, ge=1, le=10, description="Beams for beam search; 1 means greedy or plain sampling. Default 4, and 1 with stream=true.")
    num_return_sequences: int = Field(1, ge=1, le=10, description="Sequences returned: ≤ num_beams with beams, 1 for greedy.")
    length_penalty: float = Field(1.0, ge=-3.0, le=3.0, description="Beam search: a finished sequence's score is its log-probability / length ** length_penalty.")
    early_stopping: bool | Literal["never"] = Field(
        False, description="Beam search: true ends when num_beams sequences finished; false (a heuristic) and 'never' as in transformers.")

    # --- length ---
    max_new_tokens: int = Field(128, ge=1, le=2048, description="Most tokens to generate.")
    min_new_tokens: int = Field(1, ge=1, le=100, description="Fewest tokens to generate before EOS is allowed; ≤ max_new_tokens.")

    # --- sampling (used only when do_sample is true) ---
    temperature: float = Field(0.1, ge=0.1, le=2.0, description="Randomness of sampling.")
    top_p: float = Field(0.75, ge=0.01, le=1.0, description="Nucleus sampling: cumulative probability kept.")
    top_k: int = Field(40, ge=0, le=100, description="Sample among the k likeliest tokens; 0 disables.")

    # --- quality ---
    repetition_penalty: float = Field(1.2, ge=1.0, le=2.0, description="Penalty on tokens already in the sequence.")
    no_repeat_ngram_size: int = Field(0, ge=0, le=10, description="Forbid repeating any n-gram of this size; 0 disables.")
    output_scores: bool = Field(False, description="Return per-token log-probabilities.")

    # --- structured output (producer/constraints.py): at most one of the three ---
    response_format: dict[str, Any] | None = Field(
        None, description='OpenAI\'s: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}; "text" is none.')
    guided_regex: str | None = Field(None, description="The text matches this regular expression, whole.")
    guided_choice: list[str] | None = Field(None, description="The text is one of these strings.")

    # --- job-level ---
    stream: bool = Field(False, description="Publish text chunks while generating (needs num_beams=1: its default then).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Random seed for reproducible sampling.")
    stop: list[str] = Field(default_factory=list, description="Stop strings: generation ends at the first match, which is cut off.")
    adapter: str | None = Field(None, pattern=ADAPTER_NAME.pattern, description="LoRA adapter name served by the worker.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Caller's data, stored with the job and returned as is.")
    deadline: float | None = Field(None, gt=0, description="Unix time (seconds): a job not started by then ends expired without running.")
    webhook: str | None = Field(None, max_length=2048, description="URL that gets the job's events (POST, signed: Standard Webhooks); http or https.")
    webhook_events_filter: list[Literal["start", "output", "completed"]] = Field(
        default_factory=lambda: ["completed"], description="Which events go to the webhook: start, output, completed (Replicate's names).")
    idempotency_key: str | None = Field(None, min_length=1, max_length=128,
                                        description="Submitting the same key again returns the same job id and enqueues nothing (while its record lives).")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("early_stopping", mode="before")
    @classmethod
    def _check_early_stopping(cls, value: Any) -> Any:
        if value is True or value is False or value == "never":
            return value
        raise _problem(f"early_stopping must be true, false or 'never', got {reprlib.repr(value)}")

    @field_validator("response_format")
    @classmethod
    def _check_response_format(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        return None if value is None else _constrained(lambda: check_response_format(value, _limits(info).max_constraint_bytes))

    @field_validator("guided_regex")
    @classmethod
    def _check_guided_regex(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _constrained(lambda: check_regex(value, max_bytes=_limits(info).max_constraint_bytes))

    @field_validator("guided_choice")
    @classmethod
    def _check_guided_choice(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return None if value is None else _constrained(lambda: check_choices(value, _limits(info).max_constraint_bytes))

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            _check_text("prompt", value, _limits(info).max_prompt_chars, "BELLE_MAX_PROMPT_CHARS")
        return value

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, value: list[Message] | None, info: ValidationInfo) -> list[Message] | None:
        if value is None:
            return value
        limits = _limits(info)
        if not value:
            raise _problem("messages must hold at least one message, got []")
        if len(value) > limits.max_messages:
            raise _problem(f"messages must hold at most {limits.max_messages} messages, got {len(value)}; drop old turns or raise BELLE_MAX_MESSAGES")
        for i, message in enumerate(value):
            _check_text(f"messages[{i}].content", message.content, limits.max_prompt_chars, "BELLE_MAX_PROMPT_CHARS", allow_blank=message.role != "user")
            if message.role == "system" and i != 0:
                raise _problem(f"messages[{i}].role may be 'system' only for the first message, got it at position {i}")
        if value[-1].role != "user":
            raise _problem(f"messages must end with a user message, got role {value[-1].role!r} last")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str], info: ValidationInfo) -> list[str]:
        limits = _limits(info)
        if len(value) > limits.max_stop_strings:
            raise _problem(f"stop must hold at most {limits.max_stop_strings} strings, got {len(value)}")
        for i, s in enumerate(value):
            _check_text(f"stop[{i}]", s, limits.max_stop_chars, "BELLE_MAX_STOP_CHARS", allow_blank=True)
        return value

    @field_validator("webhook")
    @classmethod
    def _check_webhook(cls, value: str | None) -> str | None:
        if value is not None and (problem := webhook_url_problem(value)):
            raise _problem(f"webhook {problem}")
        return value

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if (depth := _nesting(value)) > MAX_METADATA_DEPTH:
            raise _problem(f"metadata must nest at most {MAX_METADATA_DEPTH} levels of objects and lists, got {depth}; flatten it")
        try:
            size = len(json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8"))
        except (TypeError, ValueError) as exc:
            raise _problem(f"metadata must be a JSON object of plain values, got {exc}") from None
        if size > _limits(info).max_metadata_bytes:
            raise _problem(f"metadata must be at most {_limits(info).max_metadata_bytes} bytes as JSON, got {size}; keep large data elsewhere and store a reference")
        return value

    @model_validator(mode="after")
    def _check_combination(self, info: ValidationInfo) -> GenerationRequest:
        if (self.prompt is None) == (self.messages is None):
            detail = "got neither" if self.prompt is None else "got both"
            raise PydanticCustomError("belle", "exactly one of prompt or messages is required, {detail}", {"detail": detail, "parameter": "prompt", "value": None})
        n, beams = self.num_return_sequences, self.num_beams
        most = _limits(info).max_return_sequences
        for name, value in (("num_return_sequences", n), ("num_beams", beams)):
            if value > most:
                raise _cross(name, value, f"{name} must be in [1, {most}] (BELLE_MAX_RETURN_SEQUENCES), got {value}")
        if beams > 1 and n > beams:
            raise _cross("num_return_sequences", n, f"num_return_sequences must be in [1, {beams}] with num_beams={beams}, got {n}; raise num_beams or lower num_return_sequences")
        if beams == 1 and not self.do_sample and n != 1:
            raise _cross("num_return_sequences", n, f"num_return_sequences must be 1 for greedy decoding (do_sample=false, num_beams=1), got {n}; set do_sample=true or num_beams>1")
        if self.min_new_tokens > self.max_new_tokens:
            raise _cross("min_new_tokens", self.min_new_tokens, f"min_new_tokens must be in [1, {self.max_new_tokens}] (at most max_new_tokens), got {self.min_new_tokens}")
        given = [name for name, value in (("response_format", self.response_format), ("guided_regex", self.guided_regex),
                                          ("guided_choice", self.guided_choice)) if value is not None]
        if len(given) > 1:
            raise _cross(given[1], True, f"give at most one of response_format, guided_regex and guided_choice, got {' and '.join(given)}")
        if self.constraint is not None and self.do_sample and beams > 1:
            raise _cross(given[0], True, f"{given[0]} works with greedy decoding, sampling or beam search, not beam sampling (do_sample=true with num_beams={beams}); "
                                          "set num_beams=1 or do_sample=false")
        if self.stream and beams != 1:
            raise _cross("stream", True, f"stream requires num_beams=1 (beam search knows its best sequence only at the end), got num_beams={beams}; set num_beams=1 or stream=false")
        return self

    @property
    def constraint(self) -> Constraint | None:
        """What the text is constrained to (structured output), or None."""
        return constraint_of(self.response_format, self.guided_regex, self.guided_choice)

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready form, every field explicit (``stored_form`` is what a job's record keeps)."""
        return self.model_dump(mode="json")


_PARAMETERS = tuple(GenerationRequest.model_fields)
# The values a stored request leaves out (``stored_form``): what the fields defaulted to when it was stored. A
# queued job's record keeps its request so for days: should a field's default ever change, a request stored
# before would silently take the new one. So these are written out, not read from the model; a test checks
# they are the model's defaults (changing one means versioning the stored form).
WIRE_DEFAULTS: dict[str, Any] = {
    "prompt": None, "messages": None, "preset": None, "do_sample": False, "num_beams": 4, "num_return_sequences": 1, "length_penalty": 1.0,
    "early_stopping": False, "max_new_tokens": 128, "min_new_tokens": 1, "temperature": 0.1, "top_p": 0.75, "top_k": 40,
    "repetition_penalty": 1.2, "no_repeat_ngram_size": 0, "output_scores": False, "response_format": None, "guided_regex": None,
    "guided_choice": None, "stream": False, "seed": None, "stop": [], "adapter": None, "metadata": {}, "deadline": None, "webhook": None,
    "webhook_events_filter": ["completed"], "idempotency_key": None,
}


def model_defaults() -> dict[str, Any]:
    """Each field's default in the request model, as JSON gives it back (required fields have none)."""
    return {name: json.loads(json.dumps(field.get_default(call_default_factory=True)))
            for name, field in GenerationRequest.model_fields.items() if not field.is_required()}


def stored_form(wire: Mapping[str, Any]) -> dict[str, Any]:
    """A request as a job's record stores it (once: the job's message does not carry it): its wire form less
    the fields at their defaults, about the size of what was sent (issue 20). ``full_form`` gives it back."""
    return {name: value for name, value in wire.items() if name not in WIRE_DEFAULTS or WIRE_DEFAULTS[name] != value}


def full_form(stored: Any) -> Any:
    """The wire form of a stored request (``stored_form``): every field explicit, the omitted ones at their
    defaults. A stored value that is no request (the stand-in of an unreadable message, whatever JSON a
    malformed message carried) comes back as it is."""
    if not isinstance(stored, Mapping) or ("prompt" not in stored and "messages" not in stored):
        return stored
    return {**WIRE_DEFAULTS, **stored}
_NESTED_FIELDS = {"messages": tuple(Message.model_fields)}


def parse_request(
    data: Any,
    *,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    settings: Settings | None = None,
    resolved: bool = False,
) -> GenerationRequest:
    """Validate ``data`` (a mapping, as decoded from JSON) into a ``GenerationRequest``.

    ``resolved=True`` is for the wire form (``to_wire``), whose preset is already applied: the
    worker re-validates it as it stands. Raises ``InvalidRequestError`` listing every problem;
    never any other exception for bad input.
    """
    if not isinstance(data, Mapping):
        raise InvalidRequestError.single("request", _short(data), f"request must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    preset_name = data.get("preset")
    if preset_name is not None and not resolved:
        if presets is None:
            from producer.presets import load_presets

            presets = load_presets(settings)
        if not isinstance(preset_name, str) or preset_name not in presets:
            raise InvalidRequestError.single("preset", _short(preset_name), f"preset must be one of {sorted(presets)}, got {_short(preset_name)!r}")
        data = {**presets[preset_name], **data}
    if not resolved and data.get("stream") is True and "num_beams" not in data:
        data["num_beams"] = STREAMING_NUM_BEAMS
    try:
        request = GenerationRequest.model_validate(data, context={"settings": settings or _DEFAULT_LIMITS})
    except ValidationError as exc:
        raise InvalidRequestError([_describe(error) for error in exc.errors()]) from None
    if not resolved and request.deadline is not None and request.deadline <= (now := time.time()):
        raise InvalidRequestError.single("deadline", request.deadline, f"deadline must be after now ({now:.0f}, Unix seconds), got {request.deadline:g}; "
                                         "give a later time, or none")
    return request


_DEFAULT_LIMITS = Settings.model_construct()

# num_beams of a streamed request that sets none (itself or through its preset): beam search knows its best
# sequence only at the end, so the built-in default (4) would refuse every plain streamed request.
STREAMING_NUM_BEAMS = 1


def _limits(info: ValidationInfo) -> Settings:
    context = info.context or {}
    return context.get("settings") or _DEFAULT_LIMITS


def _constrained(check: Callable[[], Any]) -> Any:
    try:
        return check()
    except ConstraintProblem as exc:
        raise _cross(exc.parameter, None, str(exc)) from None


def _problem(message: str) -> PydanticCustomError:
    return PydanticCustomError("belle", message)


def _cross(parameter: str, value: Any, message: str) -> PydanticCustomError:
    return PydanticCustomError("belle", message, {"parameter": parameter, "value": value})


# C0 control characters other than tab, newline and carriage return: in a prompt they are binary data
# pasted by mistake (NUL ends strings in C libraries; ESC sequences are terminal output), never text.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")

MAX_METADATA_DEPTH = 32


def _check_text(name: str, value: str, max_chars: int, setting: str, *, allow_blank: bool = False) -> None:
    if not (value if allow_blank else value.strip()):
        raise _problem(f"{name} must not be empty")
    if len(value) > max_chars:
        raise _problem(f"{name} must be at most {max_chars} characters, got {len(value)}; shorten it or raise {setting}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _problem(f"{name} must be valid Unicode text, got an unpaired surrogate at position {exc.start}; fix the encoding of the input") from None
    if control := CONTROL_CHARACTERS.search(value):
        raise _problem(f"{name} must not hold control characters other than tab, newline and carriage return, got U+{ord(control.group()):04X} "
                       f"at position {control.start()}; remove it (binary data or terminal codes do not belong in text)")


def webhook_url_problem(url: str) -> str | None:
    """What makes a webhook URL unusable, before any address is looked up (the gateway and the deliverer
    refuse private addresses: producer/gateway/webhooks.py)."""
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError as exc:
        return f"must be an http(s) URL, got {url[:100]!r} ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http or https URL with a host, got {url[:100]!r}"
    if parts.username or parts.password:
        return "must not carry credentials (user:password@); the signature authenticates the sender"
    return None


def _nesting(value: Any) -> int:
    """How deeply lists and objects nest in a JSON value (counted without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_METADATA_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _bounds(field: str) -> tuple[Any, Any]:
    lo = hi = None
    for item in GenerationRequest.model_fields[field].metadata:
        if isinstance(item, Ge):
            lo = item.ge
        elif isinstance(item, Le):
            hi = item.le
    return lo, hi


_TYPE_NAMES = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a JSON object",
    "model_type": "a JSON object",
    "literal_error": None,
}


def _describe(error: Mapping[str, Any]) -> ParameterProblem:
    loc = [str(part) for part in error["loc"]]
    ctx = error.get("ctx") or {}
    parameter = ctx.get("parameter") or _location(loc)
    value = ctx.get("value", error.get("input"))
    kind = error["type"]
    top = loc[0] if loc else "request"
    if kind in ("greater_than_equal", "less_than_equal", "finite_number") and top in _PARAMETERS and len(loc) == 1 and None not in _bounds(top):
        lo, hi = _bounds(top)
        message = f"{parameter} must be in [{lo}, {hi}], got {_short(value)}"
    elif kind == "extra_forbidden" and len(loc) > 1:
        known = _NESTED_FIELDS.get(top, ())
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; it takes {', '.join(known)}" if known else "")
        message = f"unknown field {loc[-1]!r} in {_location(loc[:-1])}{hint}"
    elif kind == "extra_forbidden":
        close = difflib.get_close_matches(top, _PARAMETERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known parameters: {', '.join(_PARAMETERS)}"
        message = f"unknown parameter {top!r}{hint}"
    elif kind == "finite_number":
        message = f"{parameter} must be a finite number, got {_short(value)}"
    elif kind == "belle":
        message = error["msg"]
    elif kind == "string_pattern_mismatch":
        message = f"{parameter} must match {ctx.get('pattern')} (letters, digits, _ . -; at most 64), got {_short(value)!r}"
    elif kind == "literal_error":
        message = f"{parameter} must be one of {ctx.get('expected')}, got {_short(value)!r}"
    elif kind in _TYPE_NAMES:
        message = f"{parameter} must be {_TYPE_NAMES[kind]}, got {type(value).__name__} {_short(value)!r}"
    elif kind == "missing":
        message = f"{parameter} is required"
    else:
        message = f"{parameter}: {error['msg']}, got {_short(value)!r}"
    return ParameterProblem(parameter, _short(value), message)


def _location(loc: list[str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or "request"


def _short(value: Any, limit: int = 80) -> Any:
    """Values echoed in messages stay short: a 50 MB prompt is not copied into an error."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if not isinstance(value, str):
        return _SHORT_REPR.repr(value)  # bounded in depth and length, however deep or big the value
    return value if len(value) <= limit else value[:limit] + f"… ({len(value)} chars)"


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 60, 60
_SHORT_REPR.maxlist = _SHORT_REPR.maxdict = _SHORT_REPR.maxtuple = _SHORT_REPR.maxset = 4
