"""Following a job's stream: replay from the start, then live, ending on the end event.

The worker appends every chunk, and the store appends the end event, to the job's Redis stream, so
one XREAD cursor gives replay and live delivery in order, without gaps or duplicates, whenever the
reader starts. ``StreamFollower`` is that cursor's bookkeeping, shared by the sync and async clients.
"""

from __future__ import annotations

import json
from typing import Any

from producer import keys
from producer.records import JobRecord, StreamChunk, StreamEnd, StreamEvent

READ_COUNT = 1_000  # entries per XREAD


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


class StreamFollower:
    def __init__(self, job_id: str):
        self.job_id = job_id
        self.key = keys.job_chunks(job_id)
        self.last_id = "0-0"
        self.next_seq = 0
        self.done = False

    def streams(self) -> dict[str, str]:
        """The XREAD argument that continues after the last entry seen."""
        return {self.key: self.last_id}

    def take(self, reply: Any) -> list[StreamEvent]:
        """The events of an XREAD reply (RESP2 list or RESP3 dict); marks the follower done at the end event."""
        if not reply:
            return []
        batches = reply.items() if isinstance(reply, dict) else reply
        events: list[StreamEvent] = []
        for _key, entries in batches:
            for entry_id, fields in entries:
                self.last_id = entry_id
                event = parse_event(fields.get("event"))
                if event is None or self.done:
                    continue
                if isinstance(event, StreamChunk):
                    self.next_seq = event.seq + 1
                else:
                    self.done = True
                events.append(event)
        return events

    def from_record(self, record: JobRecord) -> list[StreamEvent]:
        """A final record whose job did not stream (stream=false, or it ended before its first chunk):
        its whole text as one chunk per sequence, then the end event."""
        events: list[StreamEvent] = []
        result = record.result
        if result is not None:
            for sequence in result.sequences:
                if sequence.text:
                    events.append(StreamChunk(job_id=self.job_id, seq=self.next_seq, index=sequence.index, text=sequence.text,
                                              tokens=len(sequence.token_ids), attempt=record.attempts))
                    self.next_seq += 1
        events.append(StreamEnd(job_id=self.job_id, state=record.state, finish_reasons=[s.finish_reason for s in result.sequences] if result else [],
                                error=record.error))
        self.done = True
        return events
