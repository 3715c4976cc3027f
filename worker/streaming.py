"""Per-row streaming and cancellation inside one batched generate() call.

transformers' own streamers handle batch size 1 only. ``BatchMonitor`` is a stopping criterion, so
generate() calls it after every decoding step with the whole batch: it splits the step by job,
detokenises each streaming row incrementally, publishes the new text of all rows in one Redis
pipeline, and ends the rows of cancelled jobs (the other rows go on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria

from producer.records import StreamChunk

REPLACEMENT = "\ufffd"  # what a decoder shows for the first bytes of a multi-byte character


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one matched."""
    hits = [pos for pos in (text.find(s) for s in stop) if pos >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def sendable(text: str, stop: Sequence[str]) -> str:
    """The part of a sequence's text so far that can be published now: before any stop string, not
    ending in what may become a stop string, and not ending inside a multi-byte character."""
    text, matched = cut_at_stop(text, stop)
    if matched:
        return text
    hold = max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)
    text = text[: len(text) - hold]
    return text.rstrip(REPLACEMENT)


class JobStream:
    """What one streaming job has published: its chunk counter and, per sequence, the text sent.

    It outlives a single generate() call, so a batch split after running out of memory resumes the
    job's stream where it was instead of sending its text twice."""

    def __init__(self, job_id: str, attempt: int, sequences: int, stop: Sequence[str]):
        self.job_id = job_id
        self.attempt = attempt
        self.stop = tuple(stop)
        self.next_seq = 0
        self.sent = [""] * sequences

    def advance(self, index: int, text: str, tokens: int, *, final: bool = False) -> StreamChunk | None:
        """The chunk that brings sequence ``index`` from what was sent to ``text`` (its whole text so
        far, or its final text), or None when nothing new can be sent."""
        ready = text if final else sendable(text, self.stop)
        sent = self.sent[index]
        if len(ready) <= len(sent) or not ready.startswith(sent):
            return None
        chunk = StreamChunk(job_id=self.job_id, seq=self.next_seq, index=index, text=ready[len(sent):], tokens=tokens, attempt=self.attempt)
        self.next_seq += 1
        self.sent[index] = ready
        return chunk


@dataclass
class StepHooks:
    """What the batcher hands the engine for one call: where chunks go, which jobs are cancelled,
    and the streams of the streaming jobs (by job id)."""

    publish: Callable[[list[StreamChunk]], None]
    is_cancelled: Callable[[str], bool]
    streams: dict[str, JobStream]


class BatchMonitor(StoppingCriteria):
    def __init__(self, job_ids: Sequence[str], prompt_width: int, eos_token_id: int | None, decode: Callable[[list[int]], str], hooks: StepHooks,
                 *, beam_search: bool = False):
        self.job_ids = list(job_ids)
        # Beam search hands over its candidate rows, which are not the same sequences from one step to
        # the next: only cancellation applies (it never streams).
        self.beam_search = beam_search
        self.width = prompt_width
        self.eos = eos_token_id
        self.decode = decode
        self.hooks = hooks
        self.ended: set[int] = set()  # rows that produced EOS
        self.cancelled_jobs: set[str] = set()
        self.cancelled_rows: dict[int, int] = {}  # row → generated tokens it keeps

    def rows_per_job(self, rows: int) -> int:
        return rows // len(self.job_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        rows, length = input_ids.shape
        per_job = self.rows_per_job(rows)
        generated = length - self.width
        done = [False] * rows
        newly_cancelled = {j for j in self.job_ids if j not in self.cancelled_jobs and self.hooks.is_cancelled(j)}
        self.cancelled_jobs |= newly_cancelled
        if self.beam_search:
            return torch.tensor([self.job_ids[row // per_job] in self.cancelled_jobs for row in range(rows)], dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].tolist()
        streaming_rows = []
        for row in range(rows):
            job_id = self.job_ids[row // per_job]
            if row in self.cancelled_rows or row in self.ended:
                done[row] = row in self.cancelled_rows
                continue
            if last[row] == self.eos:
                self.ended.add(row)
            elif job_id in self.cancelled_jobs:
                self.cancelled_rows[row] = generated
                done[row] = True
            elif job_id in self.hooks.streams:
                streaming_rows.append(row)
        if streaming_rows:
            tail = input_ids[streaming_rows, self.width:].tolist()
            chunks = []
            for row, tokens in zip(streaming_rows, tail, strict=True):
                stream = self.hooks.streams[self.job_ids[row // per_job]]
                chunk = stream.advance(row % per_job, self.decode(tokens), generated)
                if chunk is not None:
                    chunks.append(chunk)
            if chunks:
                self.hooks.publish(chunks)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
