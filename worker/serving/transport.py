"""kombu's Redis transport, hardened for what stops a stock worker for good ("Unrecoverable error") or
loses track of the messages it holds:

- an entry on a queue that is not a message envelope (worker/serving/intake.py, ``envelope_problem``) is
  dropped before it is recorded as unacknowledged, so it never comes back; if it names one of our
  jobs, that job fails (``on_refused``) unless it has a record;
- while Redis refuses writes for lack of memory (worker/serving/redis_writes.py), recording a message taken
  off a queue waits and is tried again, so the consumer takes nothing more; a message sent back to its
  queue that Redis refuses stays unacknowledged (redelivered later) instead of stopping the consumer;
- every message this process holds is recorded as held by it (the delivery tag it gives the message names
  it), so that once the process is dead (its liveness key gone) another worker sends them back to their
  queues within seconds (worker/serving/unacked.py) instead of after the visibility timeout;
- a channel closed after its connection is gone (Redis restarted or unreachable) raises a
  connection error, which Celery ignores before it reconnects, instead of an AttributeError (kombu
  reads ``self.connection.client.hostname`` of a connection already closed: kombu issue #582). The
  channel's unacknowledged messages stay in Redis and are redelivered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from producer import keys
from producer.connection import is_out_of_memory
from producer.sentinel_transport import SentinelListChannel, SentinelListTransport
from worker.serving.intake import envelope_problem, named_job
from worker.serving.lua import script
from worker.serving.redis_writes import RedisWrites
from worker.serving.unacked import LEGACY_HOLDER_OF, holder_of, new_delivery_tag

log = logging.getLogger("belle.transport")


class NotAnEnvelope(ValueError):
    def __init__(self, reason: str, raw=None):
        self.raw = raw
        super().__init__(reason)


class PutBack(Exception):
    """A message taken off its queue that could not be recorded as in hand (Redis refused writes until
    the worker stopped) went back to the head of its queue."""


# What a queue entry that is not a message envelope raises while it is decoded (JSON, UTF-8 and
# base64 errors are ValueErrors). Redis's own errors are none of these: they go on up, as in stock
# kombu, and no further entry is taken off the queue meanwhile.
_NOT_AN_ENVELOPE = (ValueError, TypeError, KeyError, AttributeError)


class CheckedMessage(virtual.Message):
    """A kombu message made only from a well-formed envelope."""

    def __init__(self, payload, channel=None, **kwargs):
        if (problem := envelope_problem(payload)) is not None:
            raise NotAnEnvelope(problem, payload)
        # The delivery tag keys kombu's record of a message in hand (the unacked hash, shared by every worker). The
        # sender chose it, and two messages sent with one tag would share one record: acknowledging either would
        # forget both, and sending one back would send the other's body. Each message taken gets a tag of its own,
        # which names the process that holds it.
        payload["properties"]["delivery_tag"] = new_delivery_tag(getattr(channel, "incarnation", None))
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except _NOT_AN_ENVELOPE as exc:
            raise NotAnEnvelope(f"its body could not be decoded ({type(exc).__name__}: {str(exc)[:200]})", payload) from None


class TagsInHand:
    """The delivery tags of the messages this process has taken and not yet acknowledged, rejected or sent back
    (thread-safe): what it holds in fact, whatever Redis's records say after losing writes (worker/serving/unacked.py)."""

    def __init__(self) -> None:
        self._tags: set[str] = set()
        self._lock = threading.Lock()

    def add(self, tag: str) -> None:
        with self._lock:
            self._tags.add(tag)

    def discard(self, tag: str) -> None:
        with self._lock:
            self._tags.discard(tag)

    def snapshot(self) -> set[str]:
        with self._lock:
            return set(self._tags)


class QoS(kombu_redis.QoS):
    def append(self, message, delivery_tag):
        channel = self.channel
        delivery = message.delivery_info
        channel.tags_in_hand.add(delivery_tag)  # (before Redis records it as this process's)

        def record() -> None:
            # One round trip, no transaction (MULTI and EXEC would be two more commands per message). The index entry
            # first: should the entry itself not be written (Redis refusing it, or crashing), kombu's restore drops an
            # index entry without one, and the message counts as lost, not held, so the lost-message sweep sends it
            # again (worker/serving/sweeper.py), as for a worker lost between BRPOP and this. (kombu looks at an index
            # entry only once it is older than the visibility timeout.) The process is in keys.HOLDERS from its announcer.
            with channel.conn_or_acquire() as client:
                pipe = client.pipeline(transaction=False)
                pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
                pipe.hset(self.unacked_key, delivery_tag, json.dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
                pipe.execute()

        what = "recording a message taken off a queue"
        try:
            channel.writes.patiently(record, what)
        except redis.RedisError as exc:
            if not is_out_of_memory(exc):
                raise
            # The worker stops while Redis refuses writes: the message goes back where it was taken from, or
            # (Redis before 7) the worker waits until it can be recorded, as it would have been. (What part of its
            # record was written goes first: deletions are served while Redis is full.)
            with contextlib.suppress(redis.RedisError):
                self._forget(delivery_tag)
            if channel.put_back(message):
                channel.tags_in_hand.discard(delivery_tag)
                raise PutBack() from exc
            channel.writes.patiently(record, what, until_stopping=False)
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag):
        try:
            self._forget(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)
        finally:
            self.channel.tags_in_hand.discard(delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        try:
            if requeue:
                super().reject(delivery_tag, requeue=True)
            else:
                self._forget(delivery_tag)
                virtual.QoS.ack(self, delivery_tag)
        finally:
            self.channel.tags_in_hand.discard(delivery_tag)

    def _forget(self, delivery_tag) -> None:
        """Delete the record of a message in hand: deletions only, so no transaction (Redis out of memory
        refuses every command queued in a MULTI, deletions included, but serves them alone)."""
        with self.channel.conn_or_acquire() as client:
            self._remove_from_indices(delivery_tag, client.pipeline(transaction=False)).execute()

    def restore_by_tag(self, tag, client=None, leftmost=False):
        """kombu sends a message back to its queue (its visibility timeout passed, or this channel closes
        holding it); a job its dead holder had started goes back to queued with it (requeue_restored.lua)."""
        self.channel.tags_in_hand.discard(tag)
        try:
            with self.channel.conn_or_acquire(client) as conn:
                entry = conn.hget(self.unacked_key, tag)
                holder = holder_of(tag) or conn.hget(LEGACY_HOLDER_OF, tag)  # (a message an earlier version's worker took)
                super().restore_by_tag(tag, conn, leftmost)
                job_id = _job_of(entry)
                if holder and not holder_of(tag):
                    conn.hdel(LEGACY_HOLDER_OF, tag)
                if holder and job_id:
                    requeued = conn.eval(_REQUEUE_RESTORED, 1, keys.job(job_id), holder, keys.worker_alive(holder))
                    if requeued:
                        log.warning("job %s: its dead worker's message went back to its queue (visibility timeout); its record is queued again", job_id)
        except redis.RedisError as exc:
            if not self.channel.writes.refused(exc, "sending a message back to its queue"):
                raise
            log.warning("message %s stays unacknowledged: Redis refused to put it back on its queue (out of memory); it is redelivered later", tag)

    def restore_visible(self, *args, **kwargs):
        try:
            return super().restore_visible(*args, **kwargs)
        except redis.RedisError as exc:
            if not self.channel.writes.refused(exc, "redelivering messages past their visibility timeout"):
                raise
            return None


class Channel(kombu_redis.Channel):
    QoS = QoS
    Message = CheckedMessage
    # Bound per worker process (``bound_transport``).
    writes: RedisWrites = RedisWrites()
    tags_in_hand: TagsInHand = TagsInHand()
    incarnation: str | None = None
    on_refused: Callable[[str, str], None] | None = None

    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except PutBack:
            log.warning("the worker stops while Redis refuses writes: a message it had just taken went back to the head of its queue")
            return True
        except _NOT_AN_ENVELOPE as exc:
            self._dropped(exc)
            return True

    def maybe_refresh_binding_expiry(self):
        """kombu keeps the pidbox's (remote control's) binding tables from expiring: a write, which Redis refuses
        while full; that is noted once with the others (RedisWrites), not logged with a traceback each time."""
        try:
            return super().maybe_refresh_binding_expiry()
        except redis.RedisError as exc:
            if not self.writes.refused(exc, "keeping the remote control's bindings alive"):
                raise
            return None

    def put_back(self, message) -> bool:
        """Push a message taken off its queue back to the head of it, even while Redis is out of memory;
        False where Redis cannot (before 7: no script flags)."""
        delivery = message.delivery_info
        queue = self._q_for_pri(delivery["routing_key"], message.properties.get("priority") or 0)
        try:
            with self.conn_or_acquire() as client:
                client.eval(script("put_back"), 1, queue, json.dumps(message._raw))
        except redis.ResponseError as exc:
            log.error("could not put a message back on %s (%s)", queue, exc)
            return False
        return True

    def _get(self, queue):
        while True:
            try:
                return super()._get(queue)
            except _NOT_AN_ENVELOPE as exc:
                self._dropped(exc)

    def _dropped(self, exc: BaseException) -> None:
        raw = getattr(exc, "raw", None)
        job_id = named_job(raw.get("headers")) if isinstance(raw, dict) else None
        log.error("dropped an entry that is not a valid message envelope%s (%s: %.200s)", f" (job {job_id})" if job_id else "",
                  type(exc).__name__, exc)
        if job_id and self.on_refused is not None:
            self.on_refused(job_id, f"the job's message is not a valid message envelope ({str(exc)[:200]})")

    def _connparams(self, asynchronous=False):
        if self.connection is None or getattr(self.connection, "client", None) is None:
            raise redis.ConnectionError("the broker connection is already closed")
        return super()._connparams(asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, SentinelListChannel):
    """The same, on a primary found through Redis Sentinel (a ``sentinel://`` URL): every connection asks
    the sentinels where the primary is, again after a failover."""


class SentinelTransport(Transport):
    Channel = SentinelChannel
    default_port = SentinelListTransport.default_port


def bound_transport(*, writes: RedisWrites, incarnation: str | None, on_refused: Callable[[str, str], None] | None,
                    sentinel: bool = False, tags_in_hand: TagsInHand | None = None) -> type[Transport]:
    """The transport class for one worker process: its Redis write state, its incarnation, what to do with a
    refused message that names a job, and the tags of the messages it holds; ``sentinel`` for a
    ``sentinel://`` broker URL."""
    base = SentinelTransport if sentinel else Transport
    channel = type("BoundChannel", (base.Channel,), {"writes": writes, "incarnation": incarnation, "tags_in_hand": tags_in_hand or TagsInHand(),
                                                     "on_refused": staticmethod(on_refused) if on_refused else None})
    return type("BoundTransport", (base,), {"Channel": channel})


_REQUEUE_RESTORED = script("requeue_restored")


def _job_of(entry: bytes | str | None) -> str | None:
    """The job an unacked entry's message names, if it names one."""
    try:
        message, _, _ = json.loads(entry)
        return named_job(message["headers"])
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
