"""Streaming a job's text while it is decoded, and cancelling a job inside a generate() call.

transformers' own streamers handle batch size 1 only. A streaming job's rows run in the decoding
batch (worker/model/decoding.py), which after every step pushes each row's new tokens through an
``IncrementalText`` and its job's ``JobStream``; the batcher publishes the chunks of all rows in one
Redis pipeline per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


class IncrementalText:
    """The text of a growing token sequence, decoded a few tokens at a time (TGI's method): each push
    decodes only the tokens since the last complete character, with a few before them for context,
    so a step costs the same however long the sequence is. A token that ends inside a multi-byte
    character adds nothing until the character is complete."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.text = ""
        self._prefix = 0  # context tokens start here
        self._read = 0  # text is complete up to here

    def push(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (the whole sequence so far, which only ever grows)."""
        if len(tokens) <= self._read:
            return self.text
        before = self.decode(tokens[self._prefix:self._read])
        after = self.decode(tokens[self._prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(tokens)
        return self.text


class JobStream:
    """What one streaming job has published: its chunk counter and, per sequence, the text sent.

    It outlives a step, so a job set aside after running out of memory resumes its stream where it
    was instead of sending its text twice. ``interval_s``: the least time between two of its chunk
    sends (its first goes out at once, and what is held back goes out at its end)."""

    def __init__(self, job_id: str, attempt: int, sequences: int, stop: Sequence[str], interval_s: float = 0.0):
        self.job_id = job_id
        self.attempt = attempt
        self.stop = tuple(stop)
        self.interval_s = interval_s
        self.next_seq = 0
        self.sent = [""] * sequences
        self.last_sent_at = float("-inf")

    def due(self, now: float) -> bool:
        return now - self.last_sent_at >= self.interval_s

    def advance(self, index: int, text: str, tokens: int, *, final: bool = False, now: float | None = None) -> StreamChunk | None:
        """The chunk that brings sequence ``index`` from what was sent to ``text`` (its whole text so
        far, or its final text), or None when nothing new can be sent."""
        ready = text if final else sendable(text, self.stop)
        sent = self.sent[index]
        if len(ready) <= len(sent) or not ready.startswith(sent):
            return None
        chunk = StreamChunk(job_id=self.job_id, seq=self.next_seq, index=index, text=ready[len(sent):], tokens=tokens, attempt=self.attempt)
        self.next_seq += 1
        self.sent[index] = ready
        if now is not None:
            self.last_sent_at = now
        return chunk


class RowMonitor(StoppingCriteria):
    """Cancellation and stop strings inside one generate() call (beam sampling): a stopping criterion
    that generate() asks after every step, which ends the rows of cancelled jobs and the rows whose
    generated text holds a stop string (never counting the prompt, as the decoding batch does); the
    other rows go on."""

    def __init__(self, job_ids: Sequence[str], prompt_width: int, is_cancelled: Callable[[str], bool] | None, stop: Sequence[str],
                 decode: Callable[[list[int]], str], *, beam_search: bool = False):
        self.job_ids = list(job_ids)
        # Beam search hands over its candidate rows, which are not the same sequences from one step to
        # the next: a cancelled job's beams all end, and beam search returns its best so far.
        self.beam_search = beam_search
        self.width = prompt_width
        self.is_cancelled = is_cancelled
        self.stop = tuple(stop)
        self.decode = decode
        self.cancelled_jobs: set[str] = set()
        self.cancelled_rows: dict[int, int] = {}  # row → generated tokens it keeps

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        rows, length = input_ids.shape
        per_job = rows // len(self.job_ids)
        if self.is_cancelled is not None:
            self.cancelled_jobs |= {j for j in self.job_ids if j not in self.cancelled_jobs and self.is_cancelled(j)}
        done = [self.job_ids[row // per_job] in self.cancelled_jobs for row in range(rows)]
        if not self.beam_search:
            for row in range(rows):
                if done[row]:
                    self.cancelled_rows.setdefault(row, length - self.width)
        if self.stop:
            for row, tokens in enumerate(input_ids[:, self.width:].tolist()):
                done[row] = done[row] or cut_at_stop(self.decode(tokens), self.stop)[1]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
