"""What the gateway's routes share: reading a JSON body within its size limit, the client and presets of
the app, a job looked up for its tenant, server-sent events, and jobs cancelled after a disconnect."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import Request

from producer.aio import AsyncJobClient
from producer.errors import JobNotFoundError
from producer.gateway.auth import Tenant
from producer.gateway.errors import ApiError
from producer.jsontext import parse_json
from producer.records import JobRecord
from producer.fleet import WorkerInfo

log = logging.getLogger("belle.gateway")

_background: set[asyncio.Task] = set()  # tasks that must outlive the request that started them


def client(request: Request) -> AsyncJobClient:
    return request.app.state.client


WORKERS_FRESH_S = 1.0  # the live workers, as read at most this long ago: a model check per request costs no round trip


async def live_workers(request: Request) -> list[WorkerInfo]:
    state = request.app.state
    seen = getattr(state, "workers_seen", None)
    if seen is None or time.monotonic() - seen[0] > WORKERS_FRESH_S:
        seen = state.workers_seen = (time.monotonic(), await client(request).workers())
    return seen[1]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (whether announced or not)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {int(length)} bytes, more than the {limit} this gateway reads (BELLE_GATEWAY_MAX_BODY_BYTES)",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is more than the {limit} bytes this gateway reads (BELLE_GATEWAY_MAX_BODY_BYTES)",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; 400 naming what is wrong (content type, encoding, syntax, shape)."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind not in ("application/json", ""):
        raise ApiError(400, f"the body must be JSON (Content-Type: application/json), got {kind!r}", code="invalid_content_type")
    data = await read_body(request, request.app.state.settings.gateway_max_body_bytes)
    try:
        body = parse_json(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8 text", code="invalid_json") from None
    except ValueError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


async def owned_record(request: Request, tenant: Tenant, job_id: str) -> JobRecord:
    """The job's record if it is this tenant's; 404 otherwise (another tenant's job does not exist for it)."""
    record = await client(request).get(job_id)
    if not tenant.owns(record.tenant):
        raise JobNotFoundError(job_id)
    return record


def cancel_later(request: Request, job_id: str) -> None:
    """Cancel a job whose caller went away (from a request being torn down: the cancel outlives it)."""
    async def cancel() -> None:
        try:
            outcome = await client(request).cancel(job_id)
            log.info("job %s: its caller disconnected; %s", job_id, outcome.description)
        except Exception as exc:
            log.warning("job %s: its caller disconnected, and cancelling it failed: %s", job_id, exc)

    task = asyncio.get_running_loop().create_task(cancel())
    _background.add(task)
    task.add_done_callback(_background.discard)


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
