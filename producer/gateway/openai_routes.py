"""`POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`: OpenAI's API over the job queue.

A completion is a job: its id is the response's ``id`` (and the ``X-Job-Id`` header), so a caller can
come back to it (`GET /v1/jobs/{id}`) whatever happens to the connection. Without ``stream`` the
gateway waits for the job's record (``BELLE_GATEWAY_WAIT_S``, then 504 naming the job to poll; the
job goes on). With ``stream``, OpenAI's chunks are sent as server-sent events from the job's stream,
ending with ``data: [DONE]``; a caller that disconnects cancels the job.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from producer.errors import JobTimeoutError
from producer.gateway.auth import Tenant, authenticate
from producer.gateway.common import cancel_later, client, dumps, json_body, live_workers
from producer.gateway.errors import ApiError, job_error, unavailable
from producer.openai_compat import FINISH_REASONS, body_fields, chunk, completion, openai_job_fields, usage_chunk
from producer.records import StreamChunk
from producer.fleet import WorkerInfo

router = APIRouter()


def served_model(model: object, workers: list[WorkerInfo]) -> str:
    """The model the job will run on: 503 when no live worker serves ``model`` (or any, if none is named)."""
    served = sorted({w.model for w in workers})
    if not served:
        raise unavailable("no live worker: start one (belle-queue worker), then try again", "no_live_worker")
    if model is None:
        return served[0]
    if model not in served:
        raise unavailable(f"no live worker serves model {model!r}; the models served now are {served} (GET /v1/models)", "model_not_served")
    return str(model)


async def _completion(request: Request, tenant: Tenant, *, chat: bool):
    body = await json_body(request)
    url = "/v1/chat/completions" if chat else "/v1/completions"
    mapped = body_fields(url, body, streaming=True)
    stream = mapped.pop("stream", False) is True
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
    jobs = client(request)
    model = served_model(body.get("model"), await live_workers(request))
    fields = openai_job_fields(mapped, request.app.state.presets)
    if stream:
        fields["stream"] = True
    job_id = await jobs.submit(fields, record_fields=tenant.record_fields)
    headers = {"X-Job-Id": job_id}
    if stream:
        return EventSourceResponse(_chunks(request, job_id, model, chat=chat, include_usage=include_usage), headers=headers, ping=15)
    wait_s = request.app.state.settings.gateway_wait_s
    try:
        record = await jobs.wait(job_id, wait_s)
    except JobTimeoutError as exc:
        raise ApiError(504, f"job {job_id} is still {exc.state} after {wait_s:g} s (BELLE_GATEWAY_WAIT_S); it goes on: poll GET /v1/jobs/{job_id}",
                       type="timeout", code="job_timeout", headers=headers) from None
    if record.result is None:
        raise job_error(job_id, record.error, headers)
    return JSONResponse(completion(job_id, record.result, record.created_at, chat=chat, model=model), headers=headers)


async def _chunks(request: Request, job_id: str, model: str, *, chat: bool, include_usage: bool):
    jobs = client(request)
    created, started, ended = int(time.time()), set(), False
    try:
        async for event in jobs.stream(job_id, request.app.state.settings.gateway_wait_s):
            if isinstance(event, StreamChunk):
                yield {"data": dumps(chunk(job_id, created, model, chat=chat, index=event.index, text=event.text, first=event.index not in started))}
                started.add(event.index)
                continue
            ended = True
            record = await jobs.get(job_id)
            if record.result is None:
                error = job_error(job_id, record.error)
                yield {"data": dumps({"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}})}
            else:
                for sequence in record.result.sequences:
                    yield {"data": dumps(chunk(job_id, created, model, chat=chat, index=sequence.index, first=sequence.index not in started,
                                               finish_reason=FINISH_REASONS[sequence.finish_reason]))}
                if include_usage:
                    yield {"data": dumps(usage_chunk(job_id, created, model, record.result, chat=chat))}
            yield {"data": "[DONE]"}
    except JobTimeoutError as exc:
        yield {"data": dumps({"error": {"message": f"{exc}; it goes on: poll GET /v1/jobs/{job_id}", "type": "timeout", "param": None,
                                        "code": "job_timeout"}})}
        ended = True
    finally:
        if not ended:  # the caller went away before the end: the job is cancelled
            cancel_later(request, job_id)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, tenant: Tenant = Depends(authenticate)):
    return await _completion(request, tenant, chat=True)


@router.post("/v1/completions")
async def completions(request: Request, tenant: Tenant = Depends(authenticate)):
    return await _completion(request, tenant, chat=False)


@router.get("/v1/models")
async def models(request: Request, tenant: Tenant = Depends(authenticate)):
    workers = await live_workers(request)
    first_seen: dict[str, float] = {}
    for w in workers:
        first_seen[w.model] = min(first_seen.get(w.model, w.started_at), w.started_at)
    return {"object": "list", "data": [{"id": name, "object": "model", "created": int(at), "owned_by": "belle-queue"}
                                       for name, at in sorted(first_seen.items())]}

