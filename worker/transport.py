"""kombu's Redis transport, hardened for two failures that stop a stock worker for good
("Unrecoverable error"):

- an entry on a queue that is not a valid message envelope is logged and dropped instead of
  stopping the consumer (stock kombu decodes the popped entry outside any guard, so one stray
  `LPUSH` of non-JSON ends the worker). The entry was already popped: no redelivery loop;
- a channel closed after its connection is gone (Redis restarted or unreachable) raises a
  connection error, which Celery ignores before it reconnects, instead of an AttributeError (kombu
  reads ``self.connection.client.hostname`` of a connection already closed: kombu issue #582). The
  channel's unacknowledged messages stay in Redis and are redelivered after the visibility timeout.
"""

from __future__ import annotations

import logging

import redis
from kombu.transport import redis as kombu_redis

log = logging.getLogger("belle.transport")

TRANSPORT = "worker.transport:Transport"


# What a queue entry that is not a message envelope raises while it is decoded (JSON, UTF-8 and
# base64 errors are ValueErrors). Redis's own errors (out of memory, ...) are none of these: they go
# on up, as in stock kombu, and no further entry is taken off the queue meanwhile.
_NOT_AN_ENVELOPE = (ValueError, TypeError, KeyError, AttributeError)


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except _NOT_AN_ENVELOPE as exc:
            log.error("dropped an entry that is not a valid message envelope (%s: %.200s)", type(exc).__name__, exc)
            return True

    def _get(self, queue):
        while True:
            try:
                return super()._get(queue)
            except _NOT_AN_ENVELOPE as exc:
                log.error("dropped an entry of %s that is not a valid message envelope (%s: %.200s)", queue, type(exc).__name__, exc)


    def _connparams(self, asynchronous=False):
        if self.connection is None or getattr(self.connection, "client", None) is None:
            raise redis.ConnectionError("the broker connection is already closed")
        return super()._connparams(asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel
