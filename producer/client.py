"""The synchronous client: submit, status, get, wait, stream, cancel."""

from __future__ import annotations

import functools
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any


from producer import keys, lua
from producer.batches import BatchCancellation, Batches, BatchResultLine, BatchStatus, BatchSubmission, FileSource, ListSource, RedisListSource
from producer.connection import redis_client, typed_redis_errors
from producer.durability import Durability
from producer.end_listener import UNSUBSCRIBE_AFTER
from producer.enqueue import check_outcome, enqueue_item
from producer.errors import JobNotFoundError, JobTimeoutError, NotReplicatedError
from producer.fleet import WorkerInfo, check_against_workers, live_workers
from producer.records import JobError, JobRecord, JobResult, JobState, StreamEvent
from producer.schemas import GenerationRequest, parse_request
from producer.settings import Settings, get_settings
from producer.store import CancelOutcome, JobStore, is_final_event, now
from producer.stream_shards import CLIENT_TIMEOUT_S, StreamShards
from producer.streaming import OUT_OF_REACH, PUBSUB_RECHECK_S, READ_COUNT, RECHECK_S, StreamFollower, paused_for_redis, streams

RequestLike = GenerationRequest | Mapping[str, Any]


def prepare(request: RequestLike, settings: Settings) -> GenerationRequest:
    """Validate a request given as a model or as a mapping (which may name a preset)."""
    if isinstance(request, GenerationRequest):
        request = request.to_wire()
    return parse_request(request, settings=settings)


class JobClient:
    """Submit jobs and read their records. Thread-safe; one per process is enough.

    >>> client = JobClient.from_url("redis://localhost:6379/0")
    >>> job_id = client.submit({"prompt": "你好", "preset": "greedy"})
    >>> client.wait(job_id, timeout=60).text
    """

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self.redis = redis_client(self.settings.redis_url)
        self.durability = Durability.of(self.settings)
        self.streams = StreamShards(self.redis, self.settings.stream_redis_urls,  # where the chunk streams live
                                    lambda url: redis_client(url, timeout_s=CLIENT_TIMEOUT_S))
        self.store = JobStore(self.redis, result_ttl_s=self.settings.result_ttl_s, pending_ttl_s=self.settings.pending_ttl_s, durability=self.durability,
                              streams=self.streams)
        self._enqueue = self.redis.register_script(lua.script("enqueue"))
        self._local = threading.local()  # each thread's pub/sub connection for wait()
        self._pubsubs: weakref.WeakSet = weakref.WeakSet()
        self._pubsubs_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> JobClient:
        return cls(Settings(redis_url=url, **overrides))

    @typed_redis_errors
    def submit(self, request: RequestLike, *, queue: str = keys.QUEUE_INTERACTIVE, check_workers: bool = False,
               record_fields: Mapping[str, str] | None = None) -> str:
        """Validate and enqueue one job; returns its id. Raises InvalidRequestError on bad input, and
        with ``check_workers`` when no live worker could run it (see ``workers()``). With an
        ``idempotency_key`` already used, returns that job's id and enqueues nothing (a different
        request under the same key is refused). ``record_fields``: what the job's record holds besides
        (the gateway's ``tenant``, ``webhook``, ``webhook_events``)."""
        validated = prepare(request, self.settings)
        if check_workers:
            check_against_workers(validated, self.workers())
        item = enqueue_item(validated, queue, tuple((record_fields or {}).items()))
        try:
            outcome = self.durability.run(self.redis, self._enqueue, f"job {item.job_id} was submitted", item.job_id, **item.call(now(), self.settings))
        except NotReplicatedError as exc:
            check_outcome(exc.replies[0], item)  # (a conflict wrote nothing: that is the error to report)
            raise
        check_outcome(outcome, item)
        return item.job_id

    @typed_redis_errors
    def get(self, job_id: str) -> JobRecord:
        record = self.store.get(keys.checked_id("job_id", job_id))
        if record is None:
            raise JobNotFoundError(job_id)
        return record

    def status(self, job_id: str) -> JobState:
        return self.get(job_id).state

    @typed_redis_errors
    def wait(self, job_id: str, timeout: float) -> JobRecord:
        """Block until the job reaches a final state; raises JobTimeoutError after ``timeout`` seconds. Redis
        out of reach for a while (a restart, a Sentinel failover) is waited out within the timeout. With
        BELLE_WAIT_REPLICAS, the final state is returned once replicas hold it (a failover cannot take it
        back), or NotReplicatedError at the timeout."""
        deadline = time.monotonic() + timeout
        keys.checked_id("job_id", job_id)
        while True:
            try:
                record = self._wait(job_id, timeout, deadline)
                if self.durability.final_confirmed(self.redis, record, deadline):
                    return record
            except OUT_OF_REACH:
                if not paused_for_redis(deadline):
                    raise

    def _wait(self, job_id: str, timeout: float, deadline: float) -> JobRecord:
        channel = keys.job_channel(job_id)
        pubsub, lingering = self._pubsub()
        done = False
        try:
            if channel in lingering:  # (still subscribed from an earlier wait)
                lingering.discard(channel)
            else:
                pubsub.subscribe(channel)
            while True:
                record = self.get(job_id)
                if record.is_final:
                    done = True
                    return record
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise JobTimeoutError(job_id, timeout, record.state.value)
                # Wake on the final event; re-read now and then in case it was missed.
                until = time.monotonic() + min(remaining, PUBSUB_RECHECK_S)
                while (left := until - time.monotonic()) > 0:
                    message = pubsub.get_message(timeout=left)
                    if is_final_event(message) and message["channel"] == channel:  # (not a late event of an earlier wait's job)
                        break
        finally:
            self._done_with(pubsub, lingering, channel, reuse=done)

    def _pubsub(self):
        """This thread's pub/sub connection, kept between waits (no connection set up per job), and the channels
        of its finished waits it is still subscribed to."""
        pubsub = getattr(self._local, "pubsub", None)
        if pubsub is None:
            pubsub = self._local.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            self._local.lingering = set()
            with self._pubsubs_lock:
                self._pubsubs.add(pubsub)  # weakly: a thread that ends takes its connection back to the pool with it
        return pubsub, self._local.lingering

    def _done_with(self, pubsub, lingering: set[str], channel: str, *, reuse: bool) -> None:
        """A finished wait's channel stays subscribed (nothing is published on it after the job's end) until
        UNSUBSCRIBE_AFTER of them go in one UNSUBSCRIBE."""
        if reuse:
            lingering.add(channel)
            if len(lingering) < UNSUBSCRIBE_AFTER:
                return
            try:
                pubsub.unsubscribe(*lingering)
                lingering.clear()
                return
            except Exception:  # (a broken connection: a new one next time)
                pass
        self._local.pubsub = None  # after a timeout, an error or an interruption its state is unknown: not reused
        with self._pubsubs_lock:
            self._pubsubs.discard(pubsub)
        pubsub.close()

    @typed_redis_errors
    def stream(self, job_id: str, timeout: float) -> Iterator[StreamEvent]:
        """Yield a job's ``StreamChunk``s from the first one, whenever this is called (before, during or
        after the job runs), then its ``StreamEnd``. A job that did not stream yields its whole text
        as one chunk per sequence when it ends. Raises JobTimeoutError when the job has not ended
        within ``timeout`` seconds of the call."""
        deadline = time.monotonic() + timeout
        follower = StreamFollower(job_id)
        chunks = self.streams.of(job_id)
        if not streams(self.get(job_id)):  # its text comes whole at its end: wait for that
            yield from follower.from_record(self.wait(job_id, timeout))
            return
        while not follower.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise JobTimeoutError(job_id, timeout, self.get(job_id).state.value)
            try:
                events = follower.take(chunks.xread(follower.streams(), count=READ_COUNT, block=max(1, int(min(remaining, RECHECK_S) * 1000))))
                if not events:
                    # Quiet a while: the job may be queued, or its record may have ended it (or expired) without an end event.
                    record = self.get(job_id)
                    if record.is_final:
                        events = follower.take(chunks.xread(follower.streams(), count=READ_COUNT))
                        if not follower.done:
                            if follower.needs_history:  # (resumed: what the stream gave before, so that the record adds the rest only)
                                follower.rebuild(chunks.xrange(follower.key, "-", follower.last_id))
                            events += follower.from_record(record)
            except OUT_OF_REACH:  # (the follower goes on from the last chunk it gave)
                if (record := self._final_while_shard_away(job_id)) is not None:
                    yield from follower.from_record(record)
                    return
                if not paused_for_redis(deadline):
                    raise
                continue
            yield from events

    def _final_while_shard_away(self, job_id: str) -> JobRecord | None:
        """The job's final record, when its stream's shard is out of reach (and the primary is not): the stream
        then ends from it. None otherwise."""
        if not self.streams.sharded:
            return None
        try:
            record = self.get(job_id)
        except OUT_OF_REACH:
            return None
        return record if record.is_final else None

    # --- batches (see producer/batches.py) ---

    @typed_redis_errors
    def submit_batch(self, requests: Iterable[Mapping[str, Any] | str] | os.PathLike | RedisListSource, *, preset: str | None = None,
                     defaults: Mapping[str, Any] | None = None, batch_id: str | None = None, new: bool = False, completion_window_s: float | None = None,
                     skip_invalid: bool = False, name: str | None = None, progress: bool | None = False,
                     record_fields: Mapping[str, str] | None = None, batch_fields: Mapping[str, str] | None = None,
                     openai_url: str | None = None) -> BatchSubmission:
        """Validate every request (mappings, or JSONL lines as strings; plain or OpenAI batch lines),
        then enqueue them all to the bulk queue as one batch, in input order. ``preset`` and
        ``defaults`` apply to every line, whose own fields win. Raises InvalidRequestError listing the
        bad lines unless ``skip_invalid`` (then they come back in ``refused``). The same requests
        submitted again resume the same batch (nothing is enqueued twice) unless ``new``. The iterable
        is read into memory; a large input is better given as a file path (``pathlib.Path``: read as a
        JSONL file, twice, never whole), as ``belle-queue batch submit`` does, or as the lines of a
        Redis list (``RedisListSource``: the gateway's uploaded files). ``record_fields`` and
        ``batch_fields``: what the jobs' records and the batch's hash hold besides (the gateway's tenant
        and OpenAI batch fields); ``openai_url``: every line must be an OpenAI batch line for it."""
        if isinstance(requests, str | bytes):
            raise TypeError("submit_batch takes an iterable of requests or lines, or a pathlib.Path to a JSONL file, not a str")
        if isinstance(requests, RedisListSource):
            source = requests
        elif isinstance(requests, os.PathLike):
            source, name = FileSource(requests, self.settings.max_batch_line_bytes), name or os.path.basename(requests)
        else:
            source = ListSource(requests)
        options = {**({"preset": preset} if preset else {}), **(defaults or {})}
        return self.batches.submit(source, defaults=options, batch_id=batch_id, new=new, completion_window_s=completion_window_s,
                                   skip_invalid=skip_invalid, name=name, progress=progress, record_fields=record_fields, batch_fields=batch_fields,
                                   openai_url=openai_url)

    @typed_redis_errors
    def batch_status(self, batch_id: str) -> BatchStatus:
        """Counts by state (total, queued, running, succeeded, failed, cancelled, expired), rate and ETA."""
        return self.batches.status(batch_id)

    @typed_redis_errors
    def iter_batch_results(self, batch_id: str) -> Iterator[BatchResultLine]:
        """Every job of the batch in input order, finished or not (its ``state`` says)."""
        for job_id, fields in self.batches.results(batch_id):
            if fields["state"] is None:
                yield BatchResultLine(line=None, custom_id=None, job_id=job_id, state=None)
                continue
            yield BatchResultLine(line=int(fields["line"] or 0), custom_id=fields["custom_id"] or "", job_id=job_id, state=JobState(fields["state"]),
                                  result=JobResult.model_validate_json(fields["result"]) if fields["result"] else None,
                                  error=JobError.model_validate_json(fields["error"]) if fields["error"] else None)

    @typed_redis_errors
    def cancel_batch(self, batch_id: str) -> BatchCancellation:
        """Cancel the batch's jobs not ended yet; returns how many were ``cancelled`` (queued ones),
        ``requested`` to stop (running ones stop at their next step), had ``ended`` already, or were ``missing``
        (their record expired)."""
        return self.batches.cancel(batch_id)

    @functools.cached_property
    def batches(self) -> Batches:
        from producer.presets import load_presets

        return Batches(self.redis, self.settings, lambda: load_presets(self.settings))

    @typed_redis_errors
    def workers(self) -> list[WorkerInfo]:
        """The live workers: what each serves (model, adapters, hardware profile and caps, device)."""
        return live_workers(self.redis)

    @typed_redis_errors
    def cancel(self, job_id: str) -> CancelOutcome:
        """Cancel a job: a queued one ends ``cancelled`` without running; a running one stops at its
        next decoding step and keeps its partial text; a finished one is left as it is (the outcome
        says so). Raises JobNotFoundError for an unknown id."""
        return self.store.cancel(keys.checked_id("job_id", job_id))

    def close(self) -> None:
        with self._pubsubs_lock:  # (a client is closed once no thread uses it)
            pubsubs, self._pubsubs = list(self._pubsubs), weakref.WeakSet()
        for pubsub in pubsubs:
            pubsub.close()
        for shard in self.streams.shards:
            shard.close()
        self.redis.close()

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
