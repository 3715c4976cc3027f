"""Webhooks: a job's start, output and completion, and a batch's start and completion, POSTed to the URL the caller gave.

Durable, at least once: the transition scripts append each event to the stream ``keys.WEBHOOKS`` in
the same step as the state they report (producer/lua/events.lua). Every gateway process runs a deliverer
in the consumer group ``keys.WEBHOOK_GROUP``: it takes new events, and claims the events another
deliverer has held too long (it died mid-delivery: idle past twice the delivery timeout), so none is
lost. An event is acknowledged once its receiver answered 2xx, or once it has been retried for
``BELLE_WEBHOOK_RETRY_FOR_S`` (exponential back-off; attempts kept in Redis, so whichever deliverer
retries knows how many were made). Every attempt of an event carries the same ``webhook-id``.

Deliveries are signed per the Standard Webhooks spec: ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature`` = ``v1,`` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")), the secret
being the tenant's ``whsec_`` secret (docs/gateway.md, "Webhooks"). A target that resolves to a loopback,
private, link-local or otherwise reserved address is refused (at submission and again at delivery)
unless ``BELLE_WEBHOOK_ALLOW_PRIVATE``; redirects are not followed; a receiver slower than
``BELLE_WEBHOOK_TIMEOUT_S`` is cut off.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
import uuid
from urllib.parse import urlsplit

import httpx
import redis

from producer import keys
from producer.aio import AsyncJobClient
from producer.gateway.auth import KeyRing
from producer.settings import Settings

log = logging.getLogger("belle.webhooks")

CONCURRENCY = 32
MAX_BACKOFF_S = 300.0


def signature(secret: str, webhook_id: str, timestamp: str, body: bytes) -> str:
    """The ``webhook-signature`` header of a delivery (Standard Webhooks, v1)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


async def target_problem(url: str, allow_private: bool) -> str | None:
    """Why a webhook URL may not be called: an address that is not public (unless allowed), or a host
    that does not resolve."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"its host {host!r} does not resolve ({exc})"
    if allow_private:
        return None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global or address.is_multicast:
            return (f"its host {host!r} resolves to {address}, which is not a public address; webhooks go to public addresses only "
                    "(BELLE_WEBHOOK_ALLOW_PRIVATE=1 allows others)")
    return None


class WebhookDeliverer:
    def __init__(self, client: AsyncJobClient, keyring: KeyRing, settings: Settings, payload):
        self.client = client
        self.redis = client.redis
        self.keyring = keyring
        self.settings = settings
        self.payload = payload  # async (kind, id, event) -> dict | None: the event's data (a job record, a batch), None once gone
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.claim_after_ms = int(max(1.0, 2 * settings.webhook_timeout_s) * 1000)
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._tasks: set[asyncio.Task] = set()
        self._http: httpx.AsyncClient | None = None  # one pool of connections for every delivery (while run() runs)

    async def run(self, stopping: asyncio.Event) -> None:
        async with httpx.AsyncClient(follow_redirects=False, timeout=self.settings.webhook_timeout_s) as self._http:
            await self._run(stopping)

    async def _run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self._group()
                while not stopping.is_set():
                    entries = (await self.redis.xautoclaim(keys.WEBHOOKS, keys.WEBHOOK_GROUP, self.consumer, self.claim_after_ms, "0-0", count=CONCURRENCY))[1]
                    reply = await self.redis.xreadgroup(keys.WEBHOOK_GROUP, self.consumer, {keys.WEBHOOKS: ">"}, count=CONCURRENCY, block=1000)
                    for _, fresh in (reply.items() if isinstance(reply, dict) else reply or []):
                        entries += fresh
                    for entry_id, fields in entries:
                        if fields:  # (a claimed entry trimmed from the stream meanwhile has no fields)
                            await self._slots.acquire()
                            task = asyncio.create_task(self._deliver(entry_id, fields))
                            self._tasks.add(task)
                            task.add_done_callback(self._done)
            except (redis.RedisError, OSError) as exc:
                log.warning("webhook deliverer: %s; trying again", exc)
                await asyncio.wait([asyncio.create_task(stopping.wait())], timeout=1.0)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.redis.xgroup_delconsumer(keys.WEBHOOKS, keys.WEBHOOK_GROUP, self.consumer)
        except redis.RedisError:
            pass

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery failed", exc_info=task.exception())

    async def _group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.WEBHOOKS, keys.WEBHOOK_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _deliver(self, entry_id: str, fields: dict[str, str]) -> None:
        now = time.time()
        tried = json.loads(await self.redis.hget(keys.WEBHOOK_ATTEMPTS, entry_id) or "null") or {"n": 0, "first": now, "next": now}
        if tried["next"] > now:
            return  # not due: it comes back (claimed) later
        url, webhook_id = fields.get("url", ""), f"msg_{entry_id}"
        data = await self.payload(fields.get("kind"), fields.get("id", ""), fields.get("event", ""))
        problem = await target_problem(url, self.settings.webhook_allow_private)
        if data is None or problem:
            log.warning("webhook %s (%s %s %s) dropped: %s", webhook_id, fields.get("kind"), fields.get("id"), fields.get("event"),
                        problem or "its job or batch is gone")
            return await self._settle(entry_id)
        body = json.dumps({"type": f"{fields.get('kind')}.{fields.get('event')}", "timestamp": int(now), "data": data},
                          ensure_ascii=False).encode()
        timestamp = str(int(time.time()))
        secret = self.keyring.webhook_secret(fields.get("tenant", ""))
        headers = {"content-type": "application/json", "user-agent": "belle-queue-webhooks", "webhook-id": webhook_id,
                   "webhook-timestamp": timestamp, "webhook-signature": signature(secret, webhook_id, timestamp, body)}
        try:
            response = await self._http.post(url, content=body, headers=headers)
            delivered, why = 200 <= response.status_code < 300, f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            delivered, why = False, f"{type(exc).__name__}: {exc}"
        if delivered:
            return await self._settle(entry_id)
        tried["n"] += 1
        if time.time() - tried["first"] >= self.settings.webhook_retry_for_s:
            log.error("webhook %s to %s given up after %d attempts over %.0f s (last: %s)", webhook_id, url, tried["n"],
                      time.time() - tried["first"], why)
            return await self._settle(entry_id)
        tried["next"] = time.time() + min(MAX_BACKOFF_S, 2.0 ** (tried["n"] - 1))
        log.warning("webhook %s to %s: attempt %d failed (%s); retried in %.0f s or later", webhook_id, url, tried["n"], why,
                    tried["next"] - time.time())
        await self.redis.hset(keys.WEBHOOK_ATTEMPTS, entry_id, json.dumps(tried))

    async def _settle(self, entry_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(keys.WEBHOOKS, keys.WEBHOOK_GROUP, entry_id)
        pipe.hdel(keys.WEBHOOK_ATTEMPTS, entry_id)
        await pipe.execute()

