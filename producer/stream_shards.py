"""Where each job's chunk stream lives: on the primary Redis (the default), or, with
``BELLE_STREAM_REDIS_URLS``, on one of several Redis servers of their own, chosen from the job's id alone,
so that every client and worker finds it without asking anyone (issue 20).

Records, queues, scripts and pub/sub stay on the primary; only the chunk streams (the bulk of a streaming
job's writes and reads) move, so each shard takes its share of them. Then a stream's end event is not
written with the job's final state (one script, on the primary) but right after it, by whoever wrote that
state (the worker; a client cancelling a queued job writes none): a reader that sees the record final
without the end event in the stream ends the stream from the record (producer/streaming.py).

Changing the list moves most streams to another shard: change it only while no streaming job runs or is
read (the records and queues are unaffected).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from typing import Generic, TypeVar

Client = TypeVar("Client")
# A client's shard connections give up on a shard that does not answer after this (a reader's blocking XREAD
# waits at most producer/streaming.py's RECHECK_S): its readers then end their streams from the records.
CLIENT_TIMEOUT_S = 6.0
# A shard a write failed on is left alone this long (its writes dropped: the records hold the whole text),
# so that a worker does not wait on it step after step.
PAUSE_S = 5.0


def shard_urls(setting: str | None) -> list[str]:
    """The stream shards' URLs (``BELLE_STREAM_REDIS_URLS``: comma-separated; empty: none, the primary holds the streams)."""
    return [url.strip() for url in (setting or "").split(",") if url.strip()]


def shard_of(job_id: str, shards: int) -> int:
    """The shard holding ``job_id``'s stream: the same for every process, from the id alone."""
    return zlib.crc32(job_id.encode("utf-8")) % shards


class StreamShards(Generic[Client]):
    """The Redis client holding each job's chunk stream. ``primary``: the client of the records and queues;
    ``setting``: BELLE_STREAM_REDIS_URLS (none: the primary holds the streams); ``connect(url)`` makes a client
    for each shard URL (sync or asyncio, as the primary)."""

    def __init__(self, primary: Client, setting: str | None = None, connect: Callable[[str], Client] | None = None):
        self.primary = primary
        self.shards: list[Client] = [connect(url) for url in shard_urls(setting)] if connect else []
        self._paused_until: dict[int, float] = {}  # a shard's index → until when its writes are dropped (monotonic)

    @property
    def sharded(self) -> bool:
        """Whether the streams live apart from the records (on the shards)."""
        return bool(self.shards)

    def of(self, job_id: str) -> Client:
        """The client holding ``job_id``'s stream."""
        return self.shards[shard_of(job_id, len(self.shards))] if self.shards else self.primary

    def writable(self, job_id: str) -> bool:
        """Whether writes to ``job_id``'s stream are tried now (not while its shard is paused after a failure)."""
        return not self.shards or time.monotonic() >= self._paused_until.get(shard_of(job_id, len(self.shards)), 0.0)

    def failed(self, job_id: str) -> bool:
        """A write to ``job_id``'s shard failed: its writes are dropped for PAUSE_S. True when the shard was not
        paused already (the caller logs it once)."""
        shard = shard_of(job_id, len(self.shards)) if self.shards else -1
        fresh = time.monotonic() >= self._paused_until.get(shard, 0.0)
        self._paused_until[shard] = time.monotonic() + PAUSE_S
        return fresh
