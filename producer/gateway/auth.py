"""API keys and tenants. Each key is a tenant: the jobs, batches and files it makes are its own (another
key gets 404 for them). Keys come from ``BELLE_API_KEYS`` (comma-separated; a key's tenant is named
after a digest of it) or ``BELLE_API_KEYS_FILE`` (YAML: a list of ``{key, tenant, rate_per_minute,
webhook_secret}``). They are compared in constant time and never logged. With no key configured, the
gateway serves everyone as one anonymous tenant (and says so when it starts).

A key's request rate (``rate_per_minute``, default ``BELLE_RATE_PER_MINUTE``) is counted in Redis per
minute, so it holds across gateways.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

import yaml
from fastapi import Request

from producer import keys
from producer.gateway.errors import ApiError
from producer.settings import Settings


@dataclass(frozen=True)
class Tenant:
    name: str  # "" for the anonymous tenant (no keys configured)
    rate_per_minute: int | None = None
    webhook_secret: str = ""  # whsec_<base64>: signs this tenant's webhooks

    @property
    def record_fields(self) -> dict[str, str]:
        """What a job's record holds of its tenant."""
        return {"tenant": self.name} if self.name else {}

    def owns(self, tenant: str | None) -> bool:
        return (tenant or "") == self.name


def _secret(seed: str) -> str:
    return "whsec_" + base64.b64encode(hashlib.sha256(f"belle-webhook:{seed}".encode()).digest()).decode()


class KeyRing:
    def __init__(self, settings: Settings):
        self._keys: list[tuple[bytes, Tenant]] = []
        default_secret = settings.webhook_secret
        for key in (k.strip() for k in (settings.api_keys or "").split(",")):
            if key:
                name = "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]
                self._keys.append((key.encode(), Tenant(name, settings.rate_per_minute, default_secret or _secret(key))))
        if settings.api_keys_file:
            for i, entry in enumerate(yaml.safe_load(settings.api_keys_file.read_text()) or []):
                key = str(entry["key"])
                name = str(entry.get("tenant") or "key-" + hashlib.sha256(key.encode()).hexdigest()[:12])
                if not keys.ID.match(name):
                    raise ValueError(f"{settings.api_keys_file}: entry {i}: tenant must be 1 to 64 letters, digits, '_' or '-', got {name!r}")
                self._keys.append((key.encode(), Tenant(name, entry.get("rate_per_minute", settings.rate_per_minute),
                                                        str(entry.get("webhook_secret") or default_secret or _secret(key)))))
        self.anonymous = Tenant("", settings.rate_per_minute, default_secret or _secret("anonymous"))

    @property
    def open(self) -> bool:
        return not self._keys

    def webhook_secret(self, tenant: str) -> str:
        """The secret signing a tenant's webhooks."""
        return next((t.webhook_secret for _, t in self._keys if t.name == tenant), self.anonymous.webhook_secret)

    def tenant_of(self, authorization: str | None) -> Tenant | None:
        """The tenant of a ``Bearer`` key, or None. Every key is compared, in constant time."""
        if self.open:
            return self.anonymous
        scheme, _, given = (authorization or "").partition(" ")
        found = None
        for key, tenant in self._keys:
            if hmac.compare_digest(given.strip().encode(), key) and scheme.lower() == "bearer":
                found = tenant
        return found


async def authenticate(request: Request) -> Tenant:
    """The caller's tenant; 401 without a valid key; 429 over its rate."""
    state = request.app.state
    tenant = state.keyring.tenant_of(request.headers.get("authorization"))
    if tenant is None:
        raise ApiError(401, "a valid API key is required: send it as 'Authorization: Bearer <key>'", type="authentication_error", code="invalid_api_key")
    if tenant.rate_per_minute:
        minute = int(time.time() // 60)
        pipe = state.client.redis.pipeline(transaction=False)
        pipe.incr(keys.rate(tenant.name or "anonymous", minute))
        pipe.expire(keys.rate(tenant.name or "anonymous", minute), 120)
        count, _ = await pipe.execute()
        if count > tenant.rate_per_minute:
            retry = 60 - int(time.time()) % 60
            raise ApiError(429, f"rate limit reached: {tenant.rate_per_minute} requests per minute for this key; retry in {retry} s",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
    return tenant
