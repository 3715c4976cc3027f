"""kombu's Redis Sentinel transport, told every sentinel through the transport option ``sentinels``.

kombu takes ``sentinel://a;sentinel://b`` as alternate broker URLs, and a connection that fails to
reconnect moves on to the next one with the *stock* transport of that URL's scheme, dropping any
transport class of its own (the worker's hardened one: worker/serving/transport.py). So the broker URL
names one sentinel, and the channel asks all of them (producer/redis_url.py, ``SentinelURL.kombu``).
"""

from __future__ import annotations

import redis
import redis.sentinel
from kombu.transport import redis as kombu_redis


class SentinelListChannel(kombu_redis.SentinelChannel):
    from_transport_options = kombu_redis.SentinelChannel.from_transport_options + ("sentinels",)
    sentinels: list | tuple | None = None

    def _sentinel_managed_pool(self, asynchronous=False):
        params = dict(self._connparams(asynchronous))
        host, port = params.pop("host", None), params.pop("port", None)
        manager = redis.sentinel.Sentinel([tuple(s) for s in self.sentinels or [(host, port)]], min_other_sentinels=getattr(self, "min_other_sentinels", 0),
                                          sentinel_kwargs=getattr(self, "sentinel_kwargs", None), **params)
        # (kept so that kombu closes the connections to the sentinels with the channel)
        if asynchronous:
            self._async_sentinel_manager = manager
        else:
            self._sentinel_manager = manager
        if getattr(self, "master_name", None) is None:
            raise ValueError("'master_name' transport option must be specified.")
        credentials = {name: params[name] for name in ("username", "password") if name in params}
        return manager.master_for(self.master_name, redis.Redis, **credentials).connection_pool


class SentinelListTransport(kombu_redis.SentinelTransport):
    Channel = SentinelListChannel
