"""The asyncio client, with the same methods as ``JobClient``."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any


from producer import keys, lua
from producer.batches import BatchCancellation, BatchResultLine, BatchStatus, BatchSubmission
from producer.client import RequestLike, prepare
from producer.connection import async_redis_client, typed_redis_errors
from producer.durability import Durability
from producer.end_listener import AsyncEndListener
from producer.enqueue import check_outcome, enqueue_item
from producer.errors import JobNotFoundError, JobTimeoutError, NotReplicatedError
from producer.fleet import WorkerInfo, check_against_workers, live_worker_keys, parse_workers, seen_since
from producer.records import JobRecord, JobState, StreamEvent
from producer.settings import Settings, get_settings
from producer.store import CancelOutcome, cancel_call, cancel_outcome, now, record_from_hash
from producer.stream_shards import CLIENT_TIMEOUT_S, StreamShards
from producer.streaming import OUT_OF_REACH, PUBSUB_RECHECK_S, READ_COUNT, RECHECK_S, StreamFollower, paused_for_redis_async, streams, texts_so_far


class AsyncJobClient:
    """``await client.submit(...)``, ``await client.wait(job_id, timeout)`` and so on, for asyncio backends."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self.redis = async_redis_client(self.settings.redis_url)
        self._enqueue = self.redis.register_script(lua.script("enqueue"))
        self.durability = Durability.of(self.settings)
        self._cancel = self.redis.register_script(lua.script("cancel"))
        self.streams = StreamShards(self.redis, self.settings.stream_redis_urls,  # where the chunk streams live
                                    lambda url: async_redis_client(url, timeout_s=CLIENT_TIMEOUT_S))
        self._listener: AsyncEndListener | None = None  # every wait's pub/sub (producer/end_listener.py)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> AsyncJobClient:
        return cls(Settings(redis_url=url, **overrides))

    @typed_redis_errors
    async def submit(self, request: RequestLike, *, queue: str = keys.QUEUE_INTERACTIVE, check_workers: bool = False,
                     record_fields: Mapping[str, str] | None = None) -> str:
        """As ``JobClient.submit``."""
        validated = prepare(request, self.settings)
        if check_workers:
            check_against_workers(validated, await self.workers())
        item = enqueue_item(validated, queue, tuple((record_fields or {}).items()))
        try:
            outcome = await self.durability.run_async(self.redis, self._enqueue, f"job {item.job_id} was submitted", item.job_id,
                                                      **item.call(now(), self.settings))
        except NotReplicatedError as exc:
            check_outcome(exc.replies[0], item)
            raise
        check_outcome(outcome, item)
        return item.job_id

    @typed_redis_errors
    async def get(self, job_id: str) -> JobRecord:
        record = record_from_hash(job_id, await self.redis.hgetall(keys.job(keys.checked_id("job_id", job_id))))
        if record is None:
            raise JobNotFoundError(job_id)
        return record

    @typed_redis_errors
    async def texts_so_far(self, job_id: str) -> list[str]:
        """A streaming job's text per sequence as streamed so far (its final text once it has succeeded:
        ``get``'s result)."""
        return texts_so_far(await self.streams.of(job_id).xrange(keys.job_chunks(keys.checked_id("job_id", job_id))))

    async def status(self, job_id: str) -> JobState:
        return (await self.get(job_id)).state

    @typed_redis_errors
    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        """As ``JobClient.wait``."""
        deadline = time.monotonic() + timeout
        keys.checked_id("job_id", job_id)
        while True:
            try:
                record = await self._wait(job_id, timeout, deadline)
                if await self.durability.final_confirmed_async(self.redis, record, deadline):
                    return record
            except OUT_OF_REACH:
                if not await paused_for_redis_async(deadline):
                    raise

    async def _wait(self, job_id: str, timeout: float, deadline: float) -> JobRecord:
        channel = keys.job_channel(job_id)
        listener = self._end_listener()
        ended = await listener.subscribe(channel)
        try:
            while True:
                ended.clear()  # (an end event whose record is not final, a Redis crash having lost it, must not wake every pass)
                record = await self.get(job_id)
                if record.is_final:
                    return record
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise JobTimeoutError(job_id, timeout, record.state.value)
                # Woken by the end event; the record is re-read now and then in case it was missed.
                try:
                    await asyncio.wait_for(ended.wait(), min(remaining, PUBSUB_RECHECK_S))
                except TimeoutError:
                    pass
        finally:
            await listener.done(channel, ended)

    async def _final_while_shard_away(self, job_id: str) -> JobRecord | None:
        """As ``JobClient._final_while_shard_away``."""
        if not self.streams.sharded:
            return None
        try:
            record = await self.get(job_id)
        except OUT_OF_REACH:
            return None
        return record if record.is_final else None

    def _end_listener(self) -> AsyncEndListener:
        """This client's pub/sub listener for the running event loop (made on first use)."""
        listener = self._listener
        if listener is None or listener.loop is not asyncio.get_running_loop():  # (an earlier loop's, with its connection, is left to it)
            listener = self._listener = AsyncEndListener(self.redis)
        return listener

    @typed_redis_errors
    async def stream(self, job_id: str, timeout: float) -> AsyncIterator[StreamEvent]:
        """As ``JobClient.stream``."""
        async for _, event in self.events(job_id, timeout):
            yield event

    @typed_redis_errors
    async def events(self, job_id: str, timeout: float, *, after: str | None = None) -> AsyncIterator[tuple[str, StreamEvent]]:
        """As ``stream``, each event with its id (its entry in the job's stream; ``r-<seq>``/``r-end`` for
        the events made from the record of a job that did not stream); with ``after``, only the events
        after that id (SSE's Last-Event-ID)."""
        deadline = time.monotonic() + timeout
        follower = StreamFollower(job_id, after=after)
        chunks = self.streams.of(job_id)
        if not streams(await self.get(job_id)):  # its text comes whole at its end: wait for that (pub/sub, no polling)
            for item in follower.from_record_with_ids(await self.wait(job_id, timeout)):
                yield item
            return
        while not follower.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise JobTimeoutError(job_id, timeout, (await self.get(job_id)).state.value)
            try:
                events = follower.take_with_ids(await chunks.xread(follower.streams(), count=READ_COUNT,
                                                                       block=max(1, int(min(remaining, RECHECK_S) * 1000))))
                if not events:
                    record = await self.get(job_id)
                    if record.is_final:
                        events = follower.take_with_ids(await chunks.xread(follower.streams(), count=READ_COUNT))
                        if not follower.done:
                            if follower.needs_history:  # (resumed: what the stream gave before, so that the record adds the rest only)
                                follower.rebuild(await chunks.xrange(follower.key, "-", follower.last_id))
                            events += follower.from_record_with_ids(record)
            except OUT_OF_REACH:  # (the follower goes on from the last chunk it gave; the record ends it while its shard is away)
                if (record := await self._final_while_shard_away(job_id)) is not None:
                    for item in follower.from_record_with_ids(record):
                        yield item
                    return
                if not await paused_for_redis_async(deadline):
                    raise
                continue
            for item in events:
                yield item

    # --- batches: the sync implementation (producer/batches.py), on a worker thread ---

    async def submit_batch(self, requests, **options) -> BatchSubmission:
        """As ``JobClient.submit_batch`` (a file path is read on a worker thread, never blocking the loop)."""
        return await asyncio.to_thread(self.sync.submit_batch, requests, **options)

    async def batch_status(self, batch_id: str) -> BatchStatus:
        """As ``JobClient.batch_status``."""
        return await asyncio.to_thread(self.sync.batch_status, batch_id)

    async def batch_results(self, batch_id: str) -> list[BatchResultLine]:
        """As ``JobClient.iter_batch_results``, as a list (in input order)."""
        return await asyncio.to_thread(lambda: list(self.sync.iter_batch_results(batch_id)))

    async def cancel_batch(self, batch_id: str) -> BatchCancellation:
        """As ``JobClient.cancel_batch``."""
        return await asyncio.to_thread(self.sync.cancel_batch, batch_id)

    @functools.cached_property
    def sync(self):
        """A ``JobClient`` on the same settings, for the batch methods (made on first use)."""
        from producer.client import JobClient

        return JobClient(self.settings)

    @typed_redis_errors
    async def workers(self) -> list[WorkerInfo]:
        """As ``JobClient.workers``."""
        names = await self.redis.zrangebyscore(keys.WORKERS_SEEN, seen_since(), "+inf")
        return parse_workers(await self.redis.mget(live_worker_keys(names)) if names else [])

    @typed_redis_errors
    async def cancel(self, job_id: str) -> CancelOutcome:
        """As ``JobClient.cancel``."""
        keys.checked_id("job_id", job_id)
        return cancel_outcome(job_id, await self.durability.run_async(self.redis, self._cancel, f"job {job_id}'s cancellation was written",
                                                                      **cancel_call(job_id, self.settings.result_ttl_s, self.streams.sharded)))

    async def close(self) -> None:
        if self._listener is not None and self._listener.loop is asyncio.get_running_loop():
            await self._listener.close()
        self._listener = None
        for shard in self.streams.shards:
            await shard.aclose()
        await self.redis.aclose()
        if "sync" in self.__dict__:
            self.sync.close()

    async def __aenter__(self) -> AsyncJobClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
