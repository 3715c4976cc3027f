"""Following a job's stream: replay from the start, then live, ending on the end event.

The worker appends every chunk, and the script that writes the job's final state its end event, to the
job's Redis stream, so one XREAD cursor gives replay and live delivery in order, without duplicates,
whenever the reader starts. (With stream shards the end event is written right after the final state;
a stream found without it once the record is final ends from the record: ``from_record``.) ``StreamFollower`` is that cursor's bookkeeping, shared by the sync and async clients.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import redis

from producer import keys
from producer.records import JobRecord, StreamChunk, StreamEnd, StreamEvent

READ_COUNT = 1_000  # entries per XREAD
# A waiting reader re-reads the record this often, in case it missed the end (pub/sub or the stream's end
# event wake it first); below the stream shards' clients' socket timeout (producer/stream_shards.py), which a
# longer blocking read would meet.
RECHECK_S = 4.0
# A reader waiting on pub/sub alone (a job that does not stream) re-reads the record this often: only a
# pub/sub connection that reconnected (Redis restarted) can have missed the end event.
PUBSUB_RECHECK_S = 15.0
# A wait or a stream that finds Redis out of reach (a restart, a Sentinel failover) tries again this often until its timeout.
OUT_OF_REACH_PAUSE_S = 0.5
OUT_OF_REACH = (redis.ConnectionError, redis.TimeoutError)


def paused_for_redis(deadline: float) -> bool:
    """After Redis was out of reach: pause, and say whether there is time left (``time.monotonic()``) to try again."""
    if time.monotonic() + OUT_OF_REACH_PAUSE_S >= deadline:
        return False
    time.sleep(OUT_OF_REACH_PAUSE_S)
    return True


async def paused_for_redis_async(deadline: float) -> bool:
    """As ``paused_for_redis``, in asyncio."""
    if time.monotonic() + OUT_OF_REACH_PAUSE_S >= deadline:
        return False
    await asyncio.sleep(OUT_OF_REACH_PAUSE_S)
    return True
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def parse_event(data: str) -> StreamEvent | None:
    """A chunk or end event as published; None for anything else."""
    try:
        event = json.loads(data)
    except (TypeError, ValueError):
        return None
    if not isinstance(event, dict):
        return None
    if event.get("event") == "chunk":
        return StreamChunk.model_validate(event)
    if event.get("event") == "end":
        return StreamEnd.model_validate(event)
    return None


def texts_so_far(entries: Any) -> list[str]:
    """Each sequence's text as a job's stream entries (XRANGE) give it so far: the chunks of its latest
    attempt (a redelivered job streams from the start again), concatenated per sequence."""
    chunks = [e for _, fields in entries or [] if isinstance(e := parse_event(fields.get("event")), StreamChunk)]
    latest = max((c.attempt for c in chunks), default=0)
    texts: dict[int, str] = {}
    for chunk in chunks:
        if chunk.attempt == latest:
            texts[chunk.index] = texts.get(chunk.index, "") + chunk.text
    return [texts.get(i, "") for i in range(max(texts, default=-1) + 1)]


RECORD_EVENT_ID = "r-"  # ids of the events made from a final record (a job that did not stream): r-<seq>, r-end


def streams(record: JobRecord) -> bool:
    """Whether a job sends chunks (stream=true): its stream then always ends with its end event."""
    return isinstance(record.request, dict) and record.request.get("stream") is True


class StreamFollower:
    """``after``: an event id already seen (SSE's Last-Event-ID): the events after it, only.

    A stream whose chunks skip a number within one attempt lost some (a stream shard that restarted without
    them, or refused them: producer/stream_shards.py): the follower is then ``broken``, yields nothing more of
    the stream, and the reader ends it from the job's final record (``from_record``: the text the chunks had
    not given, then the end)."""

    def __init__(self, job_id: str, after: str | None = None):
        self.job_id = job_id
        self.key = keys.job_chunks(job_id)
        self.last_id = "0-0"
        self.next_seq = 0
        self.done = False
        self.broken = False
        self._skip_record_until = -1  # (resuming after an event made from a record: the events numbered up to this were seen)
        # The text each sequence's chunks of the latest attempt gave so far (None: resumed after entries of the
        # stream this follower did not read: ``needs_history``).
        self._streamed: dict[int, list[str]] | None = {}  # (its texts' parts: joined only when the record is needed)
        self._attempt = 0
        if after and after.startswith(RECORD_EVENT_ID):
            tail = after.removeprefix(RECORD_EVENT_ID)
            self._skip_record_until = int(tail) if tail.isdigit() else 10**9
            self.done = tail == "end"
        elif after and STREAM_ID.match(after):
            self.last_id = after
            self._streamed = None

    @property
    def needs_history(self) -> bool:
        """Whether the text given before it resumed is unknown (``rebuild`` from the stream's entries up to ``last_id``)."""
        return self._streamed is None

    def rebuild(self, entries: Any) -> None:
        """What the entries up to ``last_id`` (XRANGE) gave, for a follower that resumed after them."""
        self._streamed, self._attempt = {}, 0
        for _, fields in entries or []:
            if isinstance(event := parse_event(fields.get("event")), StreamChunk):
                self._track(event)

    def streams(self) -> dict[str, str]:
        """The XREAD argument that continues after the last entry seen."""
        return {self.key: self.last_id}

    def take(self, reply: Any) -> list[StreamEvent]:
        """The events of an XREAD reply (RESP2 list or RESP3 dict); marks the follower done at the end event."""
        return [event for _, event in self.take_with_ids(reply)]

    def take_with_ids(self, reply: Any) -> list[tuple[str, StreamEvent]]:
        """As ``take``, each event with its entry id in the stream."""
        if not reply:
            return []
        batches = reply.items() if isinstance(reply, dict) else reply
        events: list[tuple[str, StreamEvent]] = []
        for _key, entries in batches:
            for entry_id, fields in entries:
                self.last_id = entry_id
                event = parse_event(fields.get("event"))
                if event is None or self.done or self.broken:
                    continue
                if isinstance(event, StreamChunk):
                    if not self._track(event):
                        self.broken = True
                        continue
                    if event.seq <= self._skip_record_until:  # (resuming after an event made from the record: given before)
                        continue
                else:
                    self.done = True
                events.append((entry_id, event))
        return events

    def _track(self, chunk: StreamChunk) -> bool:
        """Count a chunk in; False when chunks before it are missing."""
        known = self._streamed is not None
        if known and chunk.attempt != self._attempt:  # (a later attempt streams from its start again)
            self._streamed, self._attempt, self.next_seq = {}, chunk.attempt, 0
        if known and chunk.seq != self.next_seq:
            return False
        self.next_seq = chunk.seq + 1
        if known:
            self._streamed.setdefault(chunk.index, []).append(chunk.text)
        return True

    def from_record(self, record: JobRecord) -> list[StreamEvent]:
        """A final record whose job did not stream (stream=false, or it ended before its first chunk):
        its whole text as one chunk per sequence, then the end event."""
        return [event for _, event in self.from_record_with_ids(record)]

    def from_record_with_ids(self, record: JobRecord) -> list[tuple[str, StreamEvent]]:
        """As ``from_record``, with ids r-<seq> and r-end. After chunks of the stream itself without its end (streams
        on shards get it after the final state, producer/stream_shards.py; a shard out of reach; a stream found
        broken), each sequence's text past what the chunks of the record's attempt gave, then the end. (Resumed
        after entries it did not read, ``needs_history`` and not rebuilt: the end only.)"""
        events: list[tuple[str, StreamEvent]] = []
        result = record.result
        streamed = self._streamed if self._streamed is None or self._attempt == record.attempts else {}
        if result is not None and streamed is not None:
            for sequence in result.sequences:
                sent = "".join(streamed.get(sequence.index, ()))
                if sequence.text.startswith(sent) and len(sequence.text) > len(sent):
                    seq = self.next_seq
                    self.next_seq += 1
                    if seq > self._skip_record_until:
                        events.append((f"{RECORD_EVENT_ID}{seq}", StreamChunk(job_id=self.job_id, seq=seq, index=sequence.index,
                                                                               text=sequence.text[len(sent):], tokens=len(sequence.token_ids),
                                                                               attempt=record.attempts)))
        events.append((f"{RECORD_EVENT_ID}end", StreamEnd(job_id=self.job_id, state=record.state,
                                                          finish_reasons=[s.finish_reason for s in result.sequences] if result else [], error=record.error)))
        self.done = True
        return events
