"""Redis connections made from the URL alone (redis://, rediss:// with ?ssl_ca_certs=..., AUTH and ACL
users as user:password@), and one-line descriptions of what goes wrong with them.

Commands that fail on a lost connection are retried with exponential back-off: briefly for a client
(a wrong URL should fail fast), for about half a minute in a worker, long enough to ride out a Redis
restart.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

CLIENT_RETRIES = 3
WORKER_RETRIES = 40  # with the back-off capped at 1 s: about 35 s in all


def redis_client(url: str, *, retries: int = CLIENT_RETRIES) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def async_redis_client(url: str, *, retries: int = CLIENT_RETRIES) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(url, decode_responses=True, health_check_interval=30,
                                        retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), retries),
                                        retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def describe_error(exc: redis.RedisError, url: str) -> str:
    """One line saying what is wrong with reaching Redis at ``url`` and what to do."""
    where = _without_password(url)
    text = str(exc)
    if isinstance(exc, redis.AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text or "invalid password" in text:
        return f"redis at {where} refused the credentials: {text}; check the user and password in the URL (redis://user:password@host:port/db)"
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (f"redis at {where}: its TLS certificate is not trusted ({text.split('] ')[-1].strip(')')}); give the CA that signed it with "
                "?ssl_ca_certs=/path/to/ca.pem in the URL")
    if "wrong version number" in text or "record layer" in text:
        return f"redis at {where}: TLS and plain connection do not match ({text}); use rediss:// for a TLS port, redis:// otherwise"
    return f"cannot reach redis at {where} ({text}); start one (`belle-queue redis`) or set --redis-url / BELLE_REDIS_URL"


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"
