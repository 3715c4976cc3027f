"""OpenAI's Files and Batch API over belle-queue's batches (producer/batches.py).

- ``POST /v1/files`` (multipart, ``purpose=batch``): the file's non-blank lines go into a Redis list
  (``BELLE_MAX_FILE_BYTES``, ``BELLE_MAX_BATCH_LINE_BYTES``, ``BELLE_MAX_BATCH_LINES``), read as they
  arrive; the file object is a hash beside it. ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``,
  ``DELETE /v1/files/{id}``.
- ``POST /v1/batches``: every line checked, the valid ones enqueued to the bulk queue (interactive jobs
  keep going first) as one belle-queue batch; an invalid line does not fail the batch: it goes to the
  error file with a 400 response body naming the parameter. The call returns once every line is in.
- ``GET /v1/batches/{id}``, ``GET /v1/batches`` (newest first, ``limit`` and ``after``),
  ``POST /v1/batches/{id}/cancel``. The output and error files (``file-out-<batch>``,
  ``file-err-<batch>``) are made from the jobs' records when read, in input order, in OpenAI's
  output-line format.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from producer import keys
from producer.batches import BatchStatus, RedisListSource, parse_duration
from producer.errors import InvalidRequestError
from producer.gateway.auth import Tenant, authenticate
from producer.gateway.common import client, json_body
from producer.gateway.errors import JOB_ERROR_STATUS, ApiError
from producer.openai_compat import OPENAI_URLS, completion
from producer.gateway.webhooks import target_problem
from producer.records import JobState
from producer.schemas import webhook_url_problem

router = APIRouter()

OUTPUT, ERRORS = "file-out-", "file-err-"
PUSH_EVERY = 1_000  # lines per Redis round trip while a file is read


def _not_found(kind: str, name: str) -> ApiError:
    return ApiError(404, f"no {kind} {name!r}: it never existed for this key, or it expired", code="not_found")


# --- files ---


@router.post("/v1/files")
async def upload(request: Request, tenant: Tenant = Depends(authenticate)):
    settings = request.app.state.settings
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_file_bytes + 64 * 1024:
        raise ApiError(413, f"the file is larger than the {settings.max_file_bytes} bytes this gateway takes (BELLE_MAX_FILE_BYTES)",
                       code="file_too_large")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "a file is uploaded as multipart/form-data with the fields file and purpose", code="invalid_content_type")
    form = await request.form(max_files=1, max_fields=4)
    purpose, upload = form.get("purpose"), form.get("file")
    if purpose != "batch":
        raise ApiError(400, f"purpose must be 'batch' (the one purpose this gateway serves), got {purpose!r}", param="purpose", code="invalid_request")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "the form has no file field", param="file", code="invalid_request")
    file_id = f"file-{uuid.uuid4().hex}"
    redis, ttl = client(request).redis, settings.pending_ttl_s
    size = lines = 0
    try:
        for chunk in _read_lines(upload.file, settings):
            size += sum(len(line) + 1 for line in chunk)
            lines += len(chunk)
            if size > settings.max_file_bytes:
                raise ApiError(413, f"the file is larger than the {settings.max_file_bytes} bytes this gateway takes (BELLE_MAX_FILE_BYTES)",
                               code="file_too_large")
            if lines > settings.max_batch_lines:
                raise ApiError(400, f"the file has more than {settings.max_batch_lines} lines (BELLE_MAX_BATCH_LINES); split it", param="file",
                               code="too_many_lines")
            await redis.rpush(keys.file_lines(file_id), *chunk)
    except BaseException:
        await redis.delete(keys.file_lines(file_id))
        raise
    finally:
        await upload.close()
    info = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()), "filename": upload.filename or "batch.jsonl",
            "purpose": "batch", "status": "processed", "tenant": tenant.name, "lines": lines}
    pipe = redis.pipeline(transaction=True)
    pipe.hset(keys.file(file_id), mapping={k: str(v) for k, v in info.items()})
    pipe.expire(keys.file(file_id), ttl)
    pipe.expire(keys.file_lines(file_id), ttl)
    await pipe.execute()
    return _file_object(info)


def _read_lines(stream, settings) -> Iterator[list[str]]:
    """The non-blank lines of an uploaded file, PUSH_EVERY at a time; 400 for a line too long or not UTF-8."""
    chunk: list[str] = []
    for number, raw in enumerate(stream, 1):
        if len(raw) > settings.max_batch_line_bytes:
            raise ApiError(400, f"line {number} is {len(raw)} bytes, more than BELLE_MAX_BATCH_LINE_BYTES={settings.max_batch_line_bytes}",
                           param="file", code="line_too_long")
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ApiError(400, f"line {number} is not UTF-8 text", param="file", code="invalid_file") from None
        if text:
            chunk.append(text)
        if len(chunk) >= PUSH_EVERY:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _file_object(info: dict[str, Any]) -> dict[str, Any]:
    return {"id": info["id"], "object": "file", "bytes": int(info["bytes"]), "created_at": int(info["created_at"]), "filename": info["filename"],
            "purpose": info["purpose"], "status": "processed", "status_details": None}


async def _owned_file(request: Request, tenant: Tenant, file_id: str) -> dict[str, str]:
    info = await client(request).redis.hgetall(keys.file(keys.checked_id("file_id", file_id)))
    if not info or not tenant.owns(info.get("tenant")):
        raise _not_found("file", file_id)
    return info


@router.get("/v1/files/{file_id}")
async def get_file(request: Request, file_id: str, tenant: Tenant = Depends(authenticate)):
    if file_id.startswith((OUTPUT, ERRORS)):
        batch_id, errors = file_id[len(OUTPUT):], file_id.startswith(ERRORS)
        status, fields = await _owned_batch(request, tenant, batch_id)
        size = sum(len(line) for line in await asyncio.to_thread(lambda: list(_result_lines(request, batch_id, fields, errors=errors))))
        return {"id": file_id, "object": "file", "bytes": size, "created_at": int(status.created_at), "filename": f"{file_id}.jsonl",
                "purpose": "batch_output", "status": "processed", "status_details": None}
    return _file_object(await _owned_file(request, tenant, file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str, tenant: Tenant = Depends(authenticate)):
    if file_id.startswith((OUTPUT, ERRORS)):
        batch_id, errors = file_id[len(OUTPUT):], file_id.startswith(ERRORS)
        _, fields = await _owned_batch(request, tenant, batch_id)
        lines = await asyncio.to_thread(lambda: list(_result_lines(request, batch_id, fields, errors=errors)))
        return StreamingResponse(iter(lines), media_type="application/jsonl")
    await _owned_file(request, tenant, file_id)
    return StreamingResponse(_stored_lines(request, file_id), media_type="application/jsonl")


async def _stored_lines(request: Request, file_id: str) -> AsyncIterator[str]:
    redis, start = client(request).redis, 0
    while lines := await redis.lrange(keys.file_lines(file_id), start, start + PUSH_EVERY - 1):
        yield "".join(line + "\n" for line in lines)
        start += len(lines)


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str, tenant: Tenant = Depends(authenticate)):
    await _owned_file(request, tenant, file_id)
    await client(request).redis.delete(keys.file(file_id), keys.file_lines(file_id))
    return {"id": file_id, "object": "file", "deleted": True}


# --- batches ---


BATCH_EVENTS = {"start", "completed"}  # a batch's webhook events: its lines are all in (it runs), it has ended


@router.post("/v1/batches")
async def create_batch(request: Request, tenant: Tenant = Depends(authenticate)):
    body = await json_body(request)
    unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window", "metadata", "webhook", "webhook_events_filter"})
    if unknown:
        raise ApiError(400, f"{unknown[0]} is not supported here; remove it", param=unknown[0], code="invalid_request")
    endpoint = body.get("endpoint")
    if endpoint not in OPENAI_URLS:
        raise ApiError(400, f"endpoint must be one of {sorted(OPENAI_URLS)}, got {endpoint!r}", param="endpoint", code="invalid_request")
    window = body.get("completion_window", "24h")
    window_s = parse_duration(window) if isinstance(window, str) else None
    if not window_s:
        raise ApiError(400, f"completion_window must be a duration such as 24h, got {window!r}", param="completion_window", code="invalid_request")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or len(json.dumps(metadata)) > 4096:
        raise ApiError(400, "metadata must be an object of at most 4096 bytes as JSON", param="metadata", code="invalid_request")
    input_file_id = body.get("input_file_id")
    if not isinstance(input_file_id, str):
        raise ApiError(400, "input_file_id is required", param="input_file_id", code="invalid_request")
    webhook = body.get("webhook")
    if webhook is not None:
        problem = webhook_url_problem(webhook) if isinstance(webhook, str) else "must be a URL"
        problem = problem or await target_problem(webhook, request.app.state.settings.webhook_allow_private)
        if problem:
            raise ApiError(400, f"webhook {problem}", param="webhook", code="invalid_request")
    events = body.get("webhook_events_filter", ["completed"])
    if not isinstance(events, list) or not events or not set(events) <= BATCH_EVENTS:
        raise ApiError(400, f"webhook_events_filter of a batch is a list of {sorted(BATCH_EVENTS)}, got {events!r}",
                       param="webhook_events_filter", code="invalid_request")
    info = await _owned_file(request, tenant, input_file_id)
    batch_id = f"batch_{uuid.uuid4().hex}"
    jobs = client(request)
    fields = {"openai_endpoint": endpoint, "input_file_id": input_file_id, "completion_window": window, "metadata": json.dumps(metadata),
              "tenant": tenant.name, **({"webhook": webhook, "webhook_events": ",".join(events)} if webhook else {})}
    submission = await jobs.submit_batch(RedisListSource(jobs.sync.redis, keys.file_lines(input_file_id)), batch_id=batch_id,
                                         completion_window_s=window_s, skip_invalid=True, name=info.get("filename"),
                                         record_fields=tenant.record_fields, batch_fields=fields, openai_url=endpoint)
    ttl = request.app.state.settings.pending_ttl_s
    pipe = jobs.redis.pipeline(transaction=False)
    if submission.refused:
        pipe.rpush(keys.batch_refused(batch_id), *(json.dumps({"line": e.line, "custom_id": e.custom_id, "message": e.message, "parameter": e.parameter})
                                                   for e in submission.refused))
        pipe.expire(keys.batch_refused(batch_id), ttl)
    pipe.zadd(keys.tenant_batches(tenant.name), {batch_id: time.time()})
    pipe.expire(keys.tenant_batches(tenant.name), ttl)
    await pipe.execute()
    status, fields = await _owned_batch(request, tenant, batch_id)
    return openai_batch(status, fields)


async def _owned_batch(request: Request, tenant: Tenant, batch_id: str) -> tuple[BatchStatus, dict[str, str]]:
    jobs = client(request)
    fields = await jobs.redis.hgetall(keys.batch(keys.checked_id("batch_id", batch_id)))
    if not fields or not fields.get("openai_endpoint") or not tenant.owns(fields.get("tenant")):
        raise _not_found("batch", batch_id)
    return await jobs.batch_status(batch_id), fields


def openai_batch(status: BatchStatus, fields: dict[str, str]) -> dict[str, Any]:
    """A belle-queue batch as OpenAI's Batch object."""
    failed = status.failed + status.expired + status.cancelled + status.refused
    if status.state == "submitting":
        state = "validating"
    elif status.state == "cancelled":
        state = "cancelled" if status.finished else "cancelling"
    elif not status.finished:
        state = "in_progress"
    else:
        state = "expired" if status.expired else "completed"
    created = int(status.created_at)
    return {
        "id": status.batch_id, "object": "batch", "endpoint": fields["openai_endpoint"], "errors": None,
        "input_file_id": fields.get("input_file_id"), "completion_window": fields.get("completion_window", "24h"), "status": state,
        "output_file_id": OUTPUT + status.batch_id, "error_file_id": ERRORS + status.batch_id, "created_at": created,
        "in_progress_at": int(status.first_started_at) if status.first_started_at else None,
        "expires_at": int(status.deadline) if status.deadline else None, "finalizing_at": None,
        "completed_at": int(fields["completed_at"]) if fields.get("completed_at") else None, "failed_at": None,
        "expired_at": None, "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": status.total + status.refused, "completed": status.succeeded, "failed": failed},
        "metadata": json.loads(fields.get("metadata") or "{}"),
    }


@router.get("/v1/batches/{batch_id}")
async def get_batch(request: Request, batch_id: str, tenant: Tenant = Depends(authenticate)):
    return openai_batch(*await _owned_batch(request, tenant, batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str, tenant: Tenant = Depends(authenticate)):
    await _owned_batch(request, tenant, batch_id)
    await client(request).cancel_batch(batch_id)
    return openai_batch(*await _owned_batch(request, tenant, batch_id))


@router.get("/v1/batches")
async def list_batches(request: Request, limit: int = 20, after: str | None = None, tenant: Tenant = Depends(authenticate)):
    if not 1 <= limit <= 100:
        raise ApiError(400, f"limit must be in [1, 100], got {limit}", param="limit", code="invalid_request")
    redis = client(request).redis
    key = keys.tenant_batches(tenant.name)
    start = 0
    if after is not None:
        rank = await redis.zrevrank(key, after)
        if rank is None:
            raise _not_found("batch", after)
        start = rank + 1
    ids = await redis.zrevrange(key, start, start + limit)
    page = []
    for batch_id in ids[:limit]:
        try:
            page.append(openai_batch(*await _owned_batch(request, tenant, batch_id)))
        except (ApiError, InvalidRequestError):
            continue  # (expired meanwhile)
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
            "has_more": len(ids) > limit}


# --- output and error files ---


def _result_lines(request: Request, batch_id: str, fields: dict[str, str], *, errors: bool) -> Iterator[str]:
    """The batch's output (or error) file, in input order: the jobs' results (or failures) and the refused lines."""
    sync = client(request).sync
    chat = fields["openai_endpoint"] == "/v1/chat/completions"
    refused = [json.loads(r) for r in sync.redis.lrange(keys.batch_refused(batch_id), 0, -1)] if errors else []
    refused.reverse()
    for line in sync.iter_batch_results(batch_id):
        while refused and line.line is not None and refused[-1]["line"] < line.line:
            yield _refused_line(refused.pop())
        entry = _job_line(line, chat, errors=errors)
        if entry is not None:
            yield entry
    while refused:
        yield _refused_line(refused.pop())


def _job_line(line, chat: bool, *, errors: bool) -> str | None:
    if line.state is None or not line.state.is_final:
        return None
    base = {"id": f"batch_req_{line.job_id}", "custom_id": line.custom_id}
    if line.state is JobState.SUCCEEDED and line.result is not None:
        if errors:
            return None
        return json.dumps(base | {"response": {"status_code": 200, "request_id": line.job_id,
                                               "body": completion(line.job_id, line.result, None, chat=chat, model=line.result.model)},
                                  "error": None}, ensure_ascii=False) + "\n"
    if not errors:
        return None
    if line.state in (JobState.EXPIRED, JobState.CANCELLED):
        code = "batch_expired" if line.state is JobState.EXPIRED else "batch_cancelled"
        message = line.error.message if line.error else f"the request was {line.state.value} before it ran"
        return json.dumps(base | {"response": None, "error": {"code": code, "message": message}}, ensure_ascii=False) + "\n"
    error = line.error
    status = JOB_ERROR_STATUS.get(error.code, 500) if error else 500
    body = {"error": {"message": error.message if error else "failed", "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": error.parameter if error else None, "code": error.code.value if error else None}}
    return json.dumps(base | {"response": {"status_code": status, "request_id": line.job_id, "body": body}, "error": None}, ensure_ascii=False) + "\n"


def _refused_line(refusal: dict[str, Any]) -> str:
    body = {"error": {"message": refusal["message"], "type": "invalid_request_error", "param": refusal.get("parameter"), "code": "invalid_request"}}
    return json.dumps({"id": f"batch_req_line_{refusal['line']}", "custom_id": refusal.get("custom_id"),
                       "response": {"status_code": 400, "request_id": None, "body": body}, "error": None}, ensure_ascii=False) + "\n"
