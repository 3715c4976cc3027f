"""Redis connections made from the URL alone (redis://, rediss://, AUTH and ACL users in the URL)."""

from __future__ import annotations

import redis
import redis.asyncio


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30, retry_on_timeout=True)


def async_redis_client(url: str) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(url, decode_responses=True, health_check_interval=30, retry_on_timeout=True)
