"""kombu's Redis transport, hardened: an entry on a queue that is not a valid message envelope is
logged and dropped instead of stopping the consumer. (Stock kombu decodes the popped entry outside
any guard, and one stray `LPUSH` of non-JSON ends the worker with "Unrecoverable error".) The entry
was already popped, so dropping it cannot cause a redelivery loop."""

from __future__ import annotations

import logging
from queue import Empty

from kombu.transport import redis as kombu_redis

log = logging.getLogger("belle.transport")

TRANSPORT = "worker.transport:Transport"


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except (Empty, *self.connection_errors):
            raise
        except Exception as exc:
            log.error("dropped an entry that is not a valid message envelope (%s: %.200s)", type(exc).__name__, exc)
            return True

    def _get(self, queue):
        while True:
            try:
                return super()._get(queue)
            except (Empty, *self.connection_errors):
                raise
            except Exception as exc:
                log.error("dropped an entry of %s that is not a valid message envelope (%s: %.200s)", queue, type(exc).__name__, exc)


class Transport(kombu_redis.Transport):
    Channel = Channel
