"""Batches: many jobs from a JSONL file (or any iterable), validated whole before anything is
enqueued, then enqueued to the bulk queue in pipelined chunks; their counts, their results in input
order, and their cancellation.

An input line is either a plain object — ``custom_id`` (optional; unique in the batch), ``prompt`` or
``messages``, and any request field — or an OpenAI batch line, ``{"custom_id", "method": "POST",
"url": "/v1/chat/completions" | "/v1/completions", "body": {...}}``, whose body is mapped to a request
(``max_tokens`` → ``max_new_tokens``, ``n`` → ``num_return_sequences``, ...) with OpenAI's defaults
(sampling at temperature 1; 0 is greedy); what has no equivalent is refused, naming the field.

A batch's jobs have ids derived from the batch id and their line, and the batch id defaults to a
digest of the input and the options: submitting the same file again (after the submitting process
crashed, say) resumes the same batch and enqueues only the lines that are not in yet.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from producer import fairness, keys, lua
from producer.connection import describe_error
from producer.durability import Durability
from producer.enqueue import Enqueue, derived_job_id, webhook_fields
from producer.errors import BelleError, InvalidRequestError
from producer.jsontext import parse_json
from producer.openai_compat import openai_job_fields, openai_request
from producer.progress import Progress
from producer.records import JobError, JobResult, JobState, default_custom_id
from producer.schemas import parse_request
from producer.settings import Settings
from producer.store import cancel_call, canonical_json, now
from producer.stream_shards import shard_urls

CHUNK = 1_000  # jobs per pipeline (one round trip)
UNDER_WAY = ("queued", "held", "running")  # a batch's counts of jobs not ended ('held': a worker holds it, not generating yet)
ENDED = ("succeeded", "failed", "cancelled", "expired")  # and of those ended
COUNTED = (*UNDER_WAY, *ENDED)


class BatchError(BelleError):
    """A batch that does not exist, or cannot be submitted as asked."""


class BatchInterruptedError(BatchError):
    """Redis failed (out of memory, connection lost: ``reason``, and the exception chained) while a
    batch's lines were enqueued. The lines already in stay in; submitting the same lines under the
    same batch id enqueues exactly the missing ones."""

    def __init__(self, batch_id: str, submitted: int, total: int, reason: str):
        self.batch_id, self.submitted, self.total = batch_id, submitted, total
        super().__init__(f"batch {batch_id} was interrupted after {submitted} of its {total} lines were in: {reason}. Nothing is lost: once Redis "
                         f"takes writes again, submit the same file with the same options and --batch-id {batch_id} "
                         "(in Python: batch_id=...) to enqueue exactly the missing lines")


@dataclass(frozen=True)
class LineError:
    line: int
    custom_id: str | None
    message: str
    parameter: str | None = None  # the request field at fault, where one is

    def to_json(self) -> str:
        return json.dumps({"line": self.line, "custom_id": self.custom_id, "error": self.message}, ensure_ascii=False)

    def __str__(self) -> str:
        return f"line {self.line}{f' ({self.custom_id})' if self.custom_id else ''}: {self.message}"


@dataclass
class BatchSubmission:
    batch_id: str
    total: int  # valid lines, all now in the batch
    created: int  # jobs this call enqueued (the others were already in: a resumed batch)
    refused: list[LineError] = field(default_factory=list)
    deadline: float | None = None


class BatchStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    batch_id: str
    state: str  # submitting | submitted | cancelled
    total: int
    queued: int = 0
    held: int = 0  # delivered to a worker, waiting there to join its decoding batch
    running: int = 0  # generating
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    refused: int = 0  # invalid lines skipped at submission
    created_at: float
    first_started_at: float | None = None
    deadline: float | None = None
    source: str | None = None
    rate: float | None = None  # jobs ended per second since the first started
    eta_s: float | None = None  # at that rate, until every job has ended

    @property
    def done(self) -> int:
        return sum(getattr(self, name) for name in ENDED)

    @property
    def finished(self) -> bool:
        if self.state == "cancelled" and self.queued == 0 and self.held == 0 and self.running == 0:
            return True  # cancelled while being submitted: some lines never got a job
        return self.state != "submitting" and self.done >= self.total


class BatchCancellation(BaseModel):
    """What ``cancel_batch`` did to each of the batch's jobs."""

    model_config = ConfigDict(frozen=True)

    cancelled: int = Field(0, description="Queued jobs, now ended 'cancelled' without running.")
    requested: int = Field(0, description="Running jobs, told to stop at their next decoding step (they keep their partial text).")
    requested_held: int = Field(0, description="Jobs a worker held but had not started: they end 'cancelled' without running.")
    ended: int = Field(0, description="Jobs that had ended already: left as they were.")
    missing: int = Field(0, description="Jobs whose record had expired: nothing to cancel.")


RECORD_GONE = "the job's record has expired (BELLE_RESULT_TTL_S after it ended, BELLE_PENDING_TTL_S before): its result is gone"


class BatchResultLine(BaseModel):
    """One input line's outcome, as written to a results file."""

    model_config = ConfigDict(frozen=True)

    line: int | None  # None (and state None): the job's record is gone (RECORD_GONE)
    custom_id: str | None
    job_id: str
    state: JobState | None
    result: JobResult | None = None
    error: JobError | None = None


# --- reading input lines ---


def parse_line(raw: Any, line: int, defaults: Mapping[str, Any], presets: Mapping[str, Mapping[str, Any]],
               openai_url: str | None = None) -> tuple[str, dict[str, Any]]:
    """(custom_id, request fields) of one input line, parsed from JSON; raises InvalidRequestError.
    With ``openai_url``, only OpenAI batch lines for that endpoint are taken (OpenAI's Batch API)."""
    if not isinstance(raw, Mapping):
        raise InvalidRequestError.single("line", None, f"a line must be a JSON object, got {type(raw).__name__}")
    data = dict(raw)
    custom_id = data.pop("custom_id", None)
    if custom_id is not None and (not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 256):
        raise InvalidRequestError.single("custom_id", custom_id, "custom_id must be a string of 1 to 256 characters")
    if openai_url is not None and data.get("url") != openai_url:
        raise InvalidRequestError.single("url", data.get("url"), f"url must be the batch's endpoint {openai_url}, got {data.get('url')!r}")
    if "body" in data or "url" in data or "method" in data:
        if custom_id is None:
            raise InvalidRequestError.single("custom_id", None, "custom_id is required on an OpenAI batch line")
        return custom_id, openai_job_fields(openai_request(data), presets, defaults)
    return custom_id or default_custom_id(line), {**defaults, **data}


# --- sources: what a batch is read from, possibly twice (once to check it, once to enqueue it) ---


class FileSource:
    """A JSONL file's non-blank lines, numbered from 1 as in the file."""

    def __init__(self, path: str | Path, max_line_bytes: int):
        self.path = Path(path)
        self.max_line_bytes = max_line_bytes

    def __iter__(self) -> Iterator[tuple[int, str]]:
        try:
            f = open(self.path, "rb")
        except OSError as exc:
            raise InvalidRequestError.single("file", str(self.path), f"cannot read the batch file {str(self.path)!r}: {exc.strerror or exc}") from None
        with f:
            for number, raw in enumerate(f, 1):
                if len(raw) > self.max_line_bytes:
                    yield number, _TooLong(len(raw), self.max_line_bytes)
                    continue
                text = raw.decode("utf-8", errors="replace").strip()
                if text:
                    yield number, text


@dataclass(frozen=True)
class _TooLong:
    size: int
    limit: int


class RedisListSource:
    """The lines of a Redis list (a file uploaded to the gateway), numbered from 1."""

    def __init__(self, redis, key: str, page: int = 1_000):
        self.redis, self.key, self.page = redis, key, page

    def __iter__(self) -> Iterator[tuple[int, str]]:
        start = 0
        while lines := self.redis.lrange(self.key, start, start + self.page - 1):
            for offset, text in enumerate(lines):
                yield start + offset + 1, text
            start += len(lines)


class ListSource:
    def __init__(self, items: Iterable[str | Mapping[str, Any]]):
        self.items = list(items)

    def __iter__(self) -> Iterator[tuple[int, str | Mapping[str, Any]]]:
        return iter(enumerate(self.items, 1))


@dataclass(frozen=True)
class LineRules:
    """How a batch's lines are read: defaults and presets for every line, and (OpenAI's Batch API) the
    one endpoint every line must name."""

    defaults: Mapping[str, Any]
    presets: Mapping[str, Mapping[str, Any]]
    openai_url: str | None = None


# --- the batch operations, against one Redis ---


class Batches:
    def __init__(self, redis, settings: Settings, presets_loader: Callable[[], Mapping[str, Mapping[str, Any]]]):
        self.redis = redis
        self.settings = settings
        self._presets_loader = presets_loader
        self._enqueue = redis.register_script(lua.script("enqueue"))
        self.durability = Durability.of(settings)
        self._cancel = redis.register_script(lua.script("cancel"))
        self._submitted = redis.register_script(lua.script("batch_submitted"))
        self._open_script = redis.register_script(lua.script("batch_open"))
        self._fair_drop = redis.register_script(lua.script("fair_drop"))

    def submit(self, source, *, defaults: Mapping[str, Any] | None = None, batch_id: str | None = None, new: bool = False,
               completion_window_s: float | None = None, skip_invalid: bool = False, queue: str = keys.QUEUE_BULK,
               name: str | None = None, progress: bool | None = None, record_fields: Mapping[str, str] | None = None,
               batch_fields: Mapping[str, str] | None = None, openai_url: str | None = None) -> BatchSubmission:
        """Check every line, then enqueue the valid ones (all of them, or with ``skip_invalid`` the
        valid ones, the others returned as refused). Raises InvalidRequestError listing the bad lines
        (the first 50) when any is bad and ``skip_invalid`` is off; nothing is enqueued then.
        ``record_fields``: what each job's record holds besides (its tenant...); ``batch_fields``: what
        the batch's hash holds besides (the gateway's OpenAI batch fields); ``openai_url``: every line
        must be an OpenAI batch line for this endpoint."""
        defaults = dict(defaults or {})
        presets = self._presets_loader()
        rules = LineRules(defaults, presets, openai_url)
        valid, refused, digest = self._check(source, rules)
        if refused and not skip_invalid:
            shown = "; ".join(str(e) for e in refused[:50])
            more = f"; and {len(refused) - 50} more" if len(refused) > 50 else ""
            raise InvalidRequestError.single("file", None, f"{len(refused)} of {len(valid) + len(refused)} lines are invalid, nothing was submitted: {shown}{more}"
                                                            " (fix them, or --skip-invalid to submit the valid lines)")
        if not valid:
            what = f"every line is invalid ({refused[0]}{'; and more' if len(refused) > 1 else ''})" if refused else \
                "it holds no line (it is empty, or blank lines only)"
            raise InvalidRequestError.single("file", None, f"nothing to submit: {what}; a batch needs at least one request line")
        digest.update(json.dumps([defaults, completion_window_s, queue, skip_invalid], sort_keys=True).encode())
        batch_id = keys.checked_id("batch_id", batch_id or (uuid.uuid4().hex if new else digest.hexdigest()[:32]))
        tenant = {"tenant": record_fields["tenant"]} if record_fields and record_fields.get("tenant") else {}  # (whose fair-share line: producer/fairness.py)
        state, deadline = self._open(batch_id, len(valid), len(refused), completion_window_s, queue, name, digest.hexdigest(), {**tenant, **(batch_fields or {})})
        if state in ("new", "submitting"):
            in_batch = [0]  # lines known to be in so far (an interruption reports it)
            try:
                created = self._enqueue_lines(source, valid, batch_id, rules, deadline, queue, progress, in_batch,
                                              tuple((record_fields or {}).items()))
                self._submitted(keys=[keys.batch(batch_id)], args=[now()])
            except redis.RedisError as exc:
                raise BatchInterruptedError(batch_id, in_batch[0], len(valid), describe_error(exc, self.settings.redis_url)) from exc
            # (after every line is in: one wait for the replicas, which covers all that went before it)
            self.durability.confirm(self.redis, f"batch {batch_id} was submitted whole")
        else:  # submitted whole before: nothing is enqueued again, even if its jobs' records have expired
            created = 0
        return BatchSubmission(batch_id, len(valid), created, refused, deadline)

    def _check(self, source, rules: LineRules) -> tuple[dict[int, Any], list[LineError], Any]:
        """The valid lines (line → its request, kept for an in-memory source, else None), the refused
        ones, and a digest of the input."""
        keep = isinstance(source, ListSource)
        valid: dict[int, Any] = {}
        refused: list[LineError] = []
        seen: dict[str, int] = {}
        digest = hashlib.sha256()
        limit = self.settings.max_batch_lines
        for count, (line, raw) in enumerate(source, 1):
            if count > limit:
                raise InvalidRequestError.single("file", None, f"a batch may hold at most {limit} lines (BELLE_MAX_BATCH_LINES); split the file")
            digest.update(f"{line}:".encode() + (raw.encode() if isinstance(raw, str) else canonical_json(raw).encode() if isinstance(raw, Mapping) else b"?") + b"\n")
            custom_id, error, request = self._validate(raw, line, rules)
            if error is None and custom_id in seen:
                error = InvalidRequestError.single("custom_id", custom_id, f"custom_id {custom_id!r} is also on line {seen[custom_id]}")
            if error is not None:
                refused.append(LineError(line, custom_id, str(error), error.parameter))
                continue
            seen[custom_id] = line
            valid[line] = (custom_id, request) if keep else None
        return valid, refused, digest

    def _validate(self, raw, line: int, rules: LineRules) -> tuple[str | None, InvalidRequestError | None, Any]:
        """(custom_id, the refusal or None, the validated request)."""
        if isinstance(raw, _TooLong):
            return None, InvalidRequestError.single("line", None, f"the line is {raw.size} bytes, more than BELLE_MAX_BATCH_LINE_BYTES={raw.limit}"), None
        custom_id = None
        try:
            if isinstance(raw, str):
                try:
                    raw = parse_json(raw)
                except ValueError as exc:
                    raise InvalidRequestError.single("line", None, f"not JSON: {exc}") from None
            if isinstance(raw, Mapping) and isinstance(raw.get("custom_id"), str):
                custom_id = raw["custom_id"]
            custom_id, fields = parse_line(raw, line, rules.defaults, rules.presets, rules.openai_url)
            request = parse_request(fields, presets=rules.presets, settings=self.settings)
        except InvalidRequestError as exc:
            return custom_id, exc, None
        return custom_id, None, request

    def _open(self, batch_id: str, total: int, refused: int, window_s: float | None, queue: str, name: str | None,
              digest: str, extra: Mapping[str, str]) -> tuple[str, float | None]:
        """Create the batch's hash, or find it (a resubmission of the same lines); returns the state it
        had ('new' when created) and its deadline."""
        created_at = now()
        deadline = round(created_at + window_s, 3) if window_s else None
        fields = {"batch_id": batch_id, "state": "submitting", "total": total, "refused": refused, "created_at": created_at, "queue": queue,
                  "digest": digest, **{counted: 0 for counted in COUNTED}}
        if deadline is not None:
            fields["deadline"] = deadline
        if name:
            fields["source"] = name
        fields.update(extra)
        state, stored_deadline, stored_digest = self._open_script(
            keys=[keys.batch(batch_id)], args=[self.settings.pending_ttl_s, *itertools.chain.from_iterable(fields.items())])
        if state == "new":
            return state, deadline
        if stored_digest and stored_digest != digest:
            raise BatchError(f"batch {batch_id} was submitted from other lines or settings; use --new or another batch id for these")
        if state == "cancelled":
            raise BatchError(f"batch {batch_id} was cancelled; submit with --new (or another batch id) to run these lines again")
        return state, float(stored_deadline) if stored_deadline else None

    def _enqueue_lines(self, source, valid: dict[int, Any], batch_id: str, rules: LineRules, deadline, queue, progress, in_batch: list[int],
                       fields: tuple[tuple[str, str], ...]) -> int:
        bar = Progress(len(valid), f"batch {batch_id[:12]}", enabled=progress)
        created = 0
        chunk: list[Enqueue] = []

        def flush() -> int:
            pipe = self.redis.pipeline(transaction=False)
            stamp = now()
            for item in chunk:
                self._enqueue(**item.call(stamp, self.settings), client=pipe)
            pipe.expire(keys.batch(batch_id), self.settings.pending_ttl_s)
            pipe.expire(keys.batch_jobs(batch_id), self.settings.pending_ttl_s)
            pipe.hget(keys.batch(batch_id), "state")
            outcomes = pipe.execute(raise_on_error=False)
            in_batch[0] += sum(outcome in ("created", "exists") for outcome in outcomes[: len(chunk)])
            if failed := next((o for o in outcomes if isinstance(o, redis.RedisError)), None):
                raise failed
            conflicts = [item.line for item, outcome in zip(chunk, outcomes, strict=False) if outcome == "conflict"]
            if conflicts:
                raise BatchError(f"batch {batch_id} already holds different jobs on lines {conflicts[:10]}: it was submitted from another file "
                                 "under the same batch id; use --new or another batch id")
            if outcomes[-1] == "cancelled":
                raise BatchError(f"batch {batch_id} was cancelled while it was being submitted")
            bar.update(len(chunk))
            return sum(outcome == "created" for outcome in outcomes[: len(chunk)])

        try:
            for line, raw in source:
                if line not in valid:
                    continue
                if valid[line] is not None:
                    custom_id, request = valid[line]
                else:
                    custom_id, error, request = self._validate(raw, line, rules)
                    if error is not None:  # the file changed between the two readings
                        raise BatchError(f"line {line} changed while the batch was submitted: {error}")
                wire = request.to_wire()
                if deadline is not None and wire["deadline"] is None:  # the batch's completion window
                    wire["deadline"] = deadline
                chunk.append(Enqueue(derived_job_id(f"batch:{batch_id}:{line}"), wire, queue, batch_id, custom_id, line, fields + webhook_fields(request)))
                if len(chunk) >= CHUNK:
                    created += flush()
                    chunk = []
            if chunk:
                created += flush()
        finally:
            bar.close()
        return created

    # --- after submission ---

    def status(self, batch_id: str) -> BatchStatus:
        data = self.redis.hgetall(keys.batch(keys.checked_id("batch_id", batch_id)))
        if not data or "total" not in data:
            raise BatchError(f"no batch {batch_id!r}: it never existed here or it expired")
        counts = {name: max(0, int(data.get(name) or 0)) for name in COUNTED}
        first = float(data["first_started_at"]) if data.get("first_started_at") else None
        status = BatchStatus(batch_id=batch_id, state=data.get("state", "submitted"), total=int(data["total"]), refused=int(data.get("refused") or 0),
                             created_at=float(data["created_at"]), first_started_at=first,
                             deadline=float(data["deadline"]) if data.get("deadline") else None, source=data.get("source"), **counts)
        if first is None or not status.done:
            return status
        rate = status.done / max(time.time() - first, 1e-9)
        return status.model_copy(update={"rate": round(rate, 3), "eta_s": round(max(0, status.total - status.done) / rate, 1)})

    def results(self, batch_id: str) -> Iterator[tuple[str, dict[str, str]]]:
        """(job id, record fields) of every job of the batch, in input order."""
        fields = ("state", "custom_id", "line", "result", "error")
        for job_ids in self._job_id_pages(batch_id):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hmget(keys.job(job_id), fields)
            for job_id, values in zip(job_ids, pipe.execute(), strict=True):
                yield job_id, dict(zip(fields, values, strict=True))

    def cancel(self, batch_id: str) -> BatchCancellation:
        """Cancel every job of the batch not ended yet: queued ones end cancelled, running ones stop at
        their next step. Returns how many of each outcome."""
        pages = self._job_id_pages(batch_id)  # (checks that the batch exists before it is marked)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.batch(batch_id), "state", "cancelled")
        pipe.hmget(keys.batch(batch_id), "queue", "tenant")
        _, (queue, tenant) = pipe.execute()
        outcomes: dict[str, int] = {}
        for job_ids in pages:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids:
                self._cancel(**cancel_call(job_id, self.settings.result_ttl_s, bool(shard_urls(self.settings.stream_redis_urls))), client=pipe)
            for outcome in pipe.execute():
                kind = "ended" if outcome.startswith("final:") else outcome
                outcomes[kind] = outcomes.get(kind, 0) + 1
        # Its jobs waiting in its fair-share line have ended (a line skips them anyway): the line goes, and their messages with it.
        if drop := fairness.drop_call(queue or keys.QUEUE_BULK, tenant or "", batch_id):
            self._fair_drop(**drop)
        self.durability.confirm(self.redis, f"the cancellation of batch {batch_id} was written whole")
        return BatchCancellation(**outcomes)

    def _job_id_pages(self, batch_id: str) -> Iterator[list[str]]:
        """The batch's job ids in input order, CHUNK at a time; BatchError at once if there is no such batch."""
        self.status(batch_id)
        return self._pages(keys.batch_jobs(batch_id))

    def _pages(self, key: str) -> Iterator[list[str]]:
        start = 0
        while job_ids := self.redis.lrange(key, start, start + CHUNK - 1):
            yield job_ids
            start += len(job_ids)


def result_line(job_id: str, fields: Mapping[str, str | None]) -> dict[str, Any]:
    """One results-file line (plain JSON, results passed through unparsed where they are JSON)."""
    if fields["state"] is None:
        return {"line": None, "custom_id": None, "job_id": job_id, "state": "unavailable", "note": RECORD_GONE}
    out: dict[str, Any] = {"line": int(fields["line"] or 0), "custom_id": fields["custom_id"] or default_custom_id(fields["line"]), "job_id": job_id,
                           "state": fields["state"]}
    if fields.get("result"):
        out["result"] = json.loads(fields["result"])
    if fields.get("error"):
        out["error"] = json.loads(fields["error"])
    return out


def parse_duration(text: str) -> float:
    """'24h', '90m', '3600s', '3600' → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise InvalidRequestError.single("completion_window", text, f"completion window must be a number of seconds or like 90m, 24h, 2d, got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
