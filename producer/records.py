"""Typed job records and results, as stored in Redis and returned to clients."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from producer.errors import ErrorCode


class JobState(StrEnum):
    QUEUED = "queued"  # accepted and waiting in a queue
    RUNNING = "running"  # a worker picked it up (attempts counts the deliveries)
    SUCCEEDED = "succeeded"  # finished; result holds the sequences
    FAILED = "failed"  # finished with a typed error
    CANCELLED = "cancelled"  # stopped on request
    EXPIRED = "expired"  # its deadline passed before it started

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})


class FinishReason(StrEnum):
    EOS = "eos"  # the model ended the sequence
    LENGTH = "length"  # max_new_tokens (or the context window) was reached
    STOP = "stop"  # a stop string matched; the text ends before it
    CANCELLED = "cancelled"  # the job was cancelled while running
    FAILED = "failed"  # a worker-side mark of a row whose job failed while decoding: never in a result (the job fails)


class _Frozen(BaseModel):
    # Read back from Redis: a field a newer worker adds is ignored, not an error (clients may be older than workers).
    model_config = ConfigDict(frozen=True, extra="ignore")


class JobError(_Frozen):
    code: ErrorCode
    message: str
    parameter: str | None = None


class SequenceResult(_Frozen):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    score: float | None = None  # beam score (length-normalised log-probability) where beams ran
    logprobs: list[float] | None = None  # per generated token, when output_scores was set
    tokens: list[str] | None = None  # with logprobs: each generated token's own text (decoded alone)


class Usage(_Frozen):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(_Frozen):
    queued_s: float  # submission to start of the attempt that finished it
    generation_s: float  # from joining the decoding batch (or the start of its generate() call) to its end
    batch_size: int  # most jobs decoded beside it (or jobs in its generate() call)
    admission_s: float | None = None  # start of the attempt to joining the decoding batch (or its generate() call)
    first_token_s: float | None = None  # joining the decoding batch to its first token (None for beam search)


class PromptFit(_Frozen):
    """How the prompt was made to fit the context window."""

    context_length: int
    messages_dropped: int = 0  # oldest messages left out
    max_new_tokens_clamped_to: int | None = None  # set when fewer tokens than asked were left


class JobResult(_Frozen):
    sequences: list[SequenceResult]
    usage: Usage
    timings: Timings
    model: str
    adapter: str | None = None
    prompt_fit: PromptFit


def default_custom_id(line: int | str) -> str:
    """A batch line's custom_id when it gives none (a job's record stores only one the line gave)."""
    return f"line-{line}"


class JobRecord(_Frozen):
    job_id: str
    state: JobState
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # times a worker began generating it (a worker lost meanwhile: one more)
    worker: str | None = None
    cancel_requested_at: float | None = None  # set by cancel() while the job was running
    batch_id: str | None = None  # the batch it came in, with its custom_id and input line
    custom_id: str | None = None
    line: int | None = None
    request: Any = None  # the validated request; for a malformed message, whatever JSON it carried
    tenant: str | None = None  # the API key's tenant that submitted it through the gateway
    result: JobResult | None = None
    error: JobError | None = None

    @property
    def is_final(self) -> bool:
        return self.state.is_final

    @property
    def text(self) -> str:
        """The first sequence's text; raises when the job has no result (an error is never text)."""
        if self.result is None:
            raise ValueError(f"job {self.job_id} has no result (state {self.state}): {self.error.message if self.error else ''}")
        return self.result.sequences[0].text


class StreamChunk(_Frozen):
    """A piece of a streaming job's text, as published while it generates.

    ``seq`` counts a job's chunks from 0 without gaps; ``index`` is the sequence the text belongs to;
    ``tokens`` is how many tokens that sequence has so far. A job's chunks of one ``index``,
    concatenated, are exactly that sequence's final text. ``attempt`` is the delivery that produced
    the chunk: should a worker die mid-job, the next attempt streams from the start again.
    """

    event: Literal["chunk"] = "chunk"
    job_id: str
    seq: int
    index: int
    text: str
    tokens: int
    attempt: int


class StreamEnd(_Frozen):
    """The last event of a job's stream: its final state and, per sequence, why it ended."""

    event: Literal["end"] = "end"
    job_id: str
    state: JobState
    finish_reasons: list[FinishReason] = []
    error: JobError | None = None


StreamEvent = StreamChunk | StreamEnd
