"""Publishing the chunks of streaming jobs: one Redis pipeline per decoding step, written by a thread
of its own while the batcher computes the next step.

Order matters: a job's chunks must be in Redis before its record's end event (written by its task
thread once its future resolves). So what the batcher wants done after a step's chunks (resolving
futures) goes through the same queue and runs after them, in order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection

import redis

from producer import keys
from producer.lua import ScriptPipeline
from producer.records import StreamChunk
from producer.stream_shards import PAUSE_S, StreamShards
from worker.serving.lua import script

log = logging.getLogger("belle.publisher")

_STOP = object()

# A streaming job holds at most one chunk per generated token per sequence, plus its end event; the
# cap only guards against a runaway writer.
STREAM_MAX_ENTRIES = 10 * 2048 + 1
OUTPUT_EVENT_EVERY_S = 0.5  # least time between two 'output' webhook events of one job (worker/serving/lua/output_event.lua)


class ChunkPublisher:
    def __init__(self, client: redis.Redis, *, ttl_s: int, writes=None, streams: StreamShards | None = None):
        self.redis = client
        self.streams = streams or StreamShards(client)  # where each job's stream lives
        self.writes = writes  # a RedisWrites: chunks refused for lack of memory are noted there
        self.ttl_s = ttl_s  # until the job ends; then the stream takes the record's result TTL
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="belle-publisher", daemon=True)
        self._output_event = client.register_script(script("output_event"))
        # job → (when it was last offered an output event, whether its webhook wants them); publisher thread only
        self._output_at: dict[str, tuple[float, bool]] = {}

    def start(self) -> ChunkPublisher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def publish(self, chunks: list[StreamChunk], then: Callable[[], None] | None = None, *, output_events: Collection[str] | None = None) -> None:
        """Queue a step's chunks (one pipeline), and what to do once they are written. ``output_events``: the
        jobs among them whose webhook may want output events (None: any of them)."""
        self._queue.put((chunks, then, output_events))

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            chunks, then, output_events = item
            try:
                if chunks:
                    self.write(chunks, output_events)
            except Exception:  # one bad item must not stop the queue behind it, nor keep its jobs from their outcomes
                log.exception("publishing failed")
            try:
                if then is not None:
                    then()
            except Exception:
                log.exception("handing jobs their outcomes failed")

    def write(self, chunks: list[StreamChunk], output_events: Collection[str] | None = None) -> None:
        """Append each chunk to its job's stream, in one pipeline: one command per chunk (readers block on the
        stream, XREAD; the job's channel carries its end event only).

        Streaming is best effort against Redis failures: generation goes on, and the final record
        still holds the whole text. A job whose webhook asked for output events gets one with its
        first chunk and then at most every OUTPUT_EVENT_EVERY_S; a job in ``output_events`` (every job,
        when None) whose webhook does not is asked once (the script checks the record) and then left alone."""
        pipe = ScriptPipeline(self.redis)
        shards = {}  # a pipeline per stream shard holding some of these jobs' streams
        now = time.monotonic()
        if len(self._output_at) > 10_000:
            self._output_at = {job: seen for job, seen in self._output_at.items() if now - seen[0] < 60}
        asked: list[tuple[int, str]] = []  # (its reply's place in the pipeline, job)
        for chunk in chunks:
            if not self.streams.writable(chunk.job_id):  # (its shard failed a write a moment ago: its readers end from the record)
                continue
            at, wants = self._output_at.get(chunk.job_id, (float("-inf"), output_events is None or chunk.job_id in output_events))
            if wants and now - at >= OUTPUT_EVENT_EVERY_S:
                self._output_at[chunk.job_id] = (now, True)
                asked.append((len(pipe), chunk.job_id))
                pipe.script(self._output_event, [keys.job(chunk.job_id)], [chunk.job_id])
            stream, shard = keys.job_chunks(chunk.job_id), self.streams.of(chunk.job_id)
            if shard is self.redis:
                into = pipe.pipe
            else:
                if id(shard) not in shards:  # (a job of the shard names it: StreamShards.failed)
                    shards[id(shard)] = (chunk.job_id, shard.pipeline(transaction=False))
                into = shards[id(shard)][1]
            into.xadd(stream, {"event": chunk.model_dump_json()}, maxlen=STREAM_MAX_ENTRIES, approximate=True)
            if chunk.seq == 0:
                into.expire(stream, self.ttl_s)
        for job_id, shard_pipe in shards.values():  # (each on its own: a shard out of reach costs its own chunks only)
            try:
                shard_pipe.execute()
            except redis.RedisError as exc:  # (best effort, and no reason to stop taking jobs: the records hold the text)
                if self.streams.failed(job_id):
                    log.warning("a stream shard refused chunks (%s); its chunks are dropped for %g s, their readers end from the records",
                                exc, PAUSE_S)
        try:
            replies = pipe.execute() if len(pipe) else []
            for place, job in asked:
                if replies[place] == 0:
                    self._output_at[job] = (now, False)
        except redis.RedisError as exc:
            if self.writes is None or not self.writes.refused(exc, "publishing chunks"):
                log.warning("could not publish %d chunks: %s", len(chunks), exc)
