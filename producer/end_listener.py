"""Waiting for jobs' end events on one pub/sub connection (asyncio): every ``wait`` of an ``AsyncJobClient``
shares its listener, instead of a connection set up per wait (issue 20: no per-job connection set-up).

A wait subscribes to its job's channel (one SUBSCRIBE) and gets an ``asyncio.Event`` that the listener's
reader sets on the job's end event. A channel whose waits are over stays subscribed until
``UNSUBSCRIBE_AFTER`` such channels are dropped in one UNSUBSCRIBE (nothing is published on a job's channel
after its end). Should the connection drop, redis-py subscribes again to every channel when it reconnects;
a wait re-reads its record now and then in any case (``PUBSUB_RECHECK_S``), so an end event missed while
reconnecting costs that delay, not the wait.
"""

from __future__ import annotations

import asyncio
import logging

from producer.store import is_final_event
from producer.streaming import OUT_OF_REACH, OUT_OF_REACH_PAUSE_S

log = logging.getLogger("belle.client")

UNSUBSCRIBE_AFTER = 64  # channels of finished waits left subscribed, then dropped in one UNSUBSCRIBE
READ_TIMEOUT_S = 1.0


class AsyncEndListener:
    def __init__(self, redis):
        self.redis = redis
        self.loop = asyncio.get_running_loop()
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._lingering: set[str] = set()  # subscribed, nobody waiting
        self._reader: asyncio.Task | None = None

    async def subscribe(self, channel: str) -> asyncio.Event:
        """An event set when ``channel``'s end event arrives (subscribed before this returns)."""
        ended = asyncio.Event()
        waiting = self._waiters.setdefault(channel, set())
        waiting.add(ended)
        if len(waiting) == 1 and channel not in self._lingering:
            try:
                await self._pubsub.subscribe(channel)
            except BaseException:
                if self._forget(channel, ended) and self._subscribed(channel):
                    self._lingering.add(channel)  # (subscribed after all, as redis-py sees it: it subscribes again on reconnecting)
                raise
        self._lingering.discard(channel)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="belle-end-listener")
        return ended

    async def done(self, channel: str, ended: asyncio.Event) -> None:
        """A wait on ``channel`` is over."""
        if not self._forget(channel, ended):
            return
        self._lingering.add(channel)
        if len(self._lingering) >= UNSUBSCRIBE_AFTER:
            channels, self._lingering = list(self._lingering), set()  # (a wait on one of them meanwhile subscribes again, after this)
            try:
                await self._pubsub.unsubscribe(*channels)
            except BaseException as exc:  # (still subscribed, as redis-py sees it: it subscribes to them again on reconnecting)
                self._lingering.update(channel for channel in channels if channel not in self._waiters and self._subscribed(channel))
                if not isinstance(exc, OUT_OF_REACH):  # (a lost connection is no reason to fail the wait that ended; a cancellation is)
                    raise

    def _subscribed(self, channel: str) -> bool:
        """Whether redis-py counts ``channel`` subscribed (and would subscribe to it again on reconnecting)."""
        return channel in self._pubsub.channels or channel.encode() in self._pubsub.channels

    def _forget(self, channel: str, ended: asyncio.Event) -> bool:
        """Whether nobody waits on ``channel`` any more."""
        waiting = self._waiters.get(channel)
        if waiting is None:
            return False
        waiting.discard(ended)
        if waiting:
            return False
        del self._waiters[channel]
        return True

    async def _read(self) -> None:
        while self._waiters:
            try:
                message = await self._pubsub.get_message(timeout=READ_TIMEOUT_S)
            except OUT_OF_REACH:
                await asyncio.sleep(OUT_OF_REACH_PAUSE_S)  # (the next read reconnects, subscribed again)
                continue
            except Exception:  # the waits re-read their records: none hangs on a reader that stopped
                log.exception("reading end events failed")
                return
            if is_final_event(message):
                for ended in self._waiters.get(message["channel"], ()):
                    ended.set()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self._pubsub.aclose()
