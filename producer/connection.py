"""Redis connections made from the URL alone (redis://, rediss:// with ?ssl_ca_certs=..., AUTH and ACL
users as user:password@, sentinel:// for a primary found through Redis Sentinel: producer/redis_url.py),
and one-line descriptions of what goes wrong with them.

Commands that fail on a lost connection are retried with exponential back-off: briefly for a client
(a wrong URL should fail fast), for about half a minute in a worker, long enough to ride out a Redis
restart.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from producer.errors import InvalidRequestError, NotReplicatedError, RedisFullError
from producer.redis_url import RedisURLError, is_sentinel_url, parse_sentinel_url, sentinel_primary, where

CLIENT_RETRIES = 3
# Connections one client may open (redis-py's default is 100: a worker's 128 task threads, or a gateway's
# open streams, each holding one, would be refused). Redis's own default maxclients is 10,000.
MAX_CONNECTIONS = 10_000
WORKER_RETRIES = 40  # with the back-off capped at 1 s: about 35 s in all


def redis_client(url: str, *, retries: int = CLIENT_RETRIES, timeout_s: float | None = None) -> redis.Redis:
    """``timeout_s``: how long a connection attempt or a reply may take (default: no limit)."""
    check_url(url)
    options = {"decode_responses": True, "health_check_interval": 30, "max_connections": MAX_CONNECTIONS,
               "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries), "retry_on_error": [redis.ConnectionError, redis.TimeoutError]}
    if timeout_s is not None:
        options |= {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if is_sentinel_url(url):
        return sentinel_primary(parse_sentinel_url(url), **options)
    return redis.Redis.from_url(url, **options)


def async_redis_client(url: str, *, retries: int = CLIENT_RETRIES, timeout_s: float | None = None) -> redis.asyncio.Redis:
    """As ``redis_client``, for asyncio."""
    check_url(url)
    options = {"decode_responses": True, "health_check_interval": 30, "max_connections": MAX_CONNECTIONS,
               "retry": AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), retries), "retry_on_error": [redis.ConnectionError, redis.TimeoutError]}
    if timeout_s is not None:
        options |= {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if is_sentinel_url(url):
        return sentinel_primary(parse_sentinel_url(url), asynchronous=True, **options)
    return redis.asyncio.Redis.from_url(url, **options)


def check_url(url: str) -> None:
    """Refuse a Redis URL that redis-py could not use, naming the setting (InvalidRequestError)."""
    if is_sentinel_url(url):
        try:
            parse_sentinel_url(url)
            return
        except RedisURLError as exc:
            raise InvalidRequestError.single("redis_url", where(url), f"the sentinel URL (--redis-url or BELLE_REDIS_URL) is not usable: {exc}; give one like "
                                             "'sentinel://host1:26379;sentinel://host2:26379;sentinel://host3:26379/0?master_name=NAME'") from None
    try:
        parts = urlsplit(url)
        port = parts.port
        redis.connection.parse_url(url)
    except (ValueError, TypeError) as exc:
        problem = str(exc)
    else:
        if port is None or 0 < port < 65536:
            return
        problem = f"port {port} is out of range"
    raise InvalidRequestError.single("redis_url", where(url),
                                     f"the Redis URL (--redis-url or BELLE_REDIS_URL) is not usable: {problem}; give one like redis://host:6379/0, "
                                     "rediss://host:6380/0 (TLS), unix:///path/redis.sock or sentinel://host:26379;sentinel://host2:26379/0?master_name=NAME")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether Redis refused a write because it is out of memory (maxmemory with noeviction).
    Redis 7 answers -OOM to scripts too; Redis 6 wraps it in a script error."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (isinstance(exc, redis.ResponseError) and "OOM command not allowed" in str(exc))


# Replies that say Redis cannot serve now, not that the command is wrong: what a worker waits out.
# (Redis 6 wraps a script's error reply: "Error running script ...: -MISCONF ...".)
_TRANSIENT_REPLY = re.compile(r"(?:^|-)(?:LOADING|BUSY|READONLY|MASTERDOWN|TRYAGAIN|NOREPLICAS|CLUSTERDOWN|MISCONF)\b")


def is_transient(exc: BaseException) -> bool:
    """Whether a Redis error may go away by itself (connection lost, timeout, out of memory, loading,
    a busy script, a replica), as opposed to a command Redis will always refuse (a key of another
    type, a script error on data that is not ours)."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | redis.exceptions.ReadOnlyError) or is_out_of_memory(exc):
        return True
    return isinstance(exc, redis.ResponseError) and _TRANSIENT_REPLY.search(str(exc)) is not None


def refused_for_good(exc: BaseException) -> bool:
    """Whether Redis will refuse the same command every time: a key of another type, or one of our
    scripts failing on data that is not ours (a field that is not a number, ...)."""
    if is_transient(exc) or not isinstance(exc, redis.ResponseError):
        return False
    text = str(exc)
    return "WRONGTYPE" in text or "user_script" in text


F = TypeVar("F", bound=Callable)


def typed_redis_errors(method: F) -> F:
    """A client method (plain, generator, coroutine or async generator) whose Redis out-of-memory
    refusals are raised as ``RedisFullError``; the client's URL is ``self.settings.redis_url``."""

    def raise_typed(self, exc: redis.RedisError) -> None:
        if is_out_of_memory(exc):
            raise RedisFullError(where(self.settings.redis_url)) from exc

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def wrapper(self, *args, **kwargs):
            try:
                async for item in method(self, *args, **kwargs):
                    yield item
            except redis.RedisError as exc:
                raise_typed(self, exc)
                raise
    elif inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def wrapper(self, *args, **kwargs):
            try:
                return await method(self, *args, **kwargs)
            except redis.RedisError as exc:
                raise_typed(self, exc)
                raise
    elif inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return (yield from method(self, *args, **kwargs))
            except redis.RedisError as exc:
                raise_typed(self, exc)
                raise
    else:
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except redis.RedisError as exc:
                raise_typed(self, exc)
                raise
    return wrapper  # type: ignore[return-value]


def describe_error(exc: redis.RedisError, url: str) -> str:
    """One line saying what is wrong with reaching Redis at ``url`` and what to do."""
    at = where(url)
    text = str(exc)
    if is_out_of_memory(exc):
        return str(exc) if isinstance(exc, RedisFullError) else str(RedisFullError(at))
    if isinstance(exc, NotReplicatedError):
        return str(exc)
    if isinstance(exc, redis.sentinel.MasterNotFoundError):
        return (f"redis at {at}: no sentinel named a reachable primary; check that the sentinels run, that master_name is the "
                "name they monitor, and sentinel_password if they have one")
    if isinstance(exc, redis.AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text or "invalid password" in text:
        return f"redis at {at} refused the credentials: {text}; check the user and password in the URL (redis://user:password@host:port/db)"
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (f"redis at {at}: its TLS certificate is not trusted ({text.split('] ')[-1].strip(')')}); give the CA that signed it with "
                "?ssl_ca_certs=/path/to/ca.pem in the URL")
    if isinstance(exc, redis.TimeoutError) and url.startswith("rediss://"):
        return (f"redis at {at}: the TLS handshake timed out ({text}); the server likely speaks plain text: use redis:// for a plain port, "
                "rediss:// only for Redis's TLS port")
    if "wrong version number" in text or "record layer" in text:
        return f"redis at {at}: TLS and plain connection do not match ({text}); use rediss:// for a TLS port, redis:// otherwise"
    if "NOPERM" in text:
        return f"redis at {at}: the user in the URL may not run this command ({text}); grant it (ACL SETUSER) or use another user"
    if isinstance(exc, redis.ResponseError):
        return f"redis at {at} refused a command: {text}"
    return f"cannot reach redis at {at} ({text}); start one (`belle-queue redis`) or set --redis-url / BELLE_REDIS_URL"
