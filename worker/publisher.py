"""Publishing a decoding step's chunks: one Redis pipeline per step, whatever the batch size."""

from __future__ import annotations

import logging

import redis

from producer import keys
from producer.records import StreamChunk
from producer.store import STREAM_MAX_ENTRIES

log = logging.getLogger("belle.publisher")


class ChunkPublisher:
    def __init__(self, client: redis.Redis, *, ttl_s: int):
        self.redis = client
        self.ttl_s = ttl_s  # until the job ends; then the stream takes the record's result TTL

    def publish(self, chunks: list[StreamChunk]) -> None:
        """Append each chunk to its job's stream and publish it on its job's channel.

        Streaming is best effort against Redis failures: generation goes on, and the final record
        still holds the whole text."""
        pipe = self.redis.pipeline(transaction=False)
        for chunk in chunks:
            data = chunk.model_dump_json()
            stream = keys.job_chunks(chunk.job_id)
            pipe.xadd(stream, {"event": data}, maxlen=STREAM_MAX_ENTRIES, approximate=True)
            if chunk.seq == 0:
                pipe.expire(stream, self.ttl_s)
            pipe.publish(keys.job_channel(chunk.job_id), data)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not publish %d chunks: %s", len(chunks), exc)
