"""The native job API, mirroring ``JobClient``: submit, read, cancel, and follow a job's events.

- ``POST /v1/jobs``: the request contract (docs/requests.md) plus ``queue`` (``interactive`` or
  ``bulk``); an ``Idempotency-Key`` header is the request's ``idempotency_key``. 202 with the job id.
- ``GET /v1/jobs/{id}``: its record. ``POST /v1/jobs/{id}/cancel``: the cancel's outcome.
- ``GET /v1/jobs/{id}/events``: server-sent events ``chunk`` and ``end`` (data: the event as JSON, id:
  its entry in the job's stream), from the first chunk whenever the caller joins; ``Last-Event-ID``
  resumes after that event. A job that did not stream sends its text when it ends. The job goes on
  if the caller disconnects, unless it asked ``?cancel_on_disconnect=true``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from producer import keys
from producer.errors import JobTimeoutError
from producer.gateway.auth import Tenant, authenticate
from producer.gateway.common import cancel_later, client, json_body, owned_record
from producer.gateway.errors import ApiError
from producer.gateway.webhooks import target_problem
from producer.records import StreamChunk
from producer.schemas import webhook_url_problem

router = APIRouter()

QUEUES = keys.QUEUE_NAMES
EVENTS_FOLLOW_S = 24 * 3600.0  # how long one events request may follow a job


def record_body(record) -> dict:
    return record.model_dump(mode="json", exclude={"tenant"})


@router.post("/v1/jobs", status_code=202)
async def submit(request: Request, tenant: Tenant = Depends(authenticate)):
    body = await json_body(request)
    queue = body.pop("queue", "interactive")
    if queue not in QUEUES:
        raise ApiError(400, f"queue must be one of {sorted(QUEUES)}, got {queue!r}", param="queue", code="invalid_request")
    header_key = request.headers.get("idempotency-key")
    if header_key is not None:
        if body.get("idempotency_key") not in (None, header_key):
            raise ApiError(400, "the Idempotency-Key header and the body's idempotency_key differ; give one", param="idempotency_key",
                           code="invalid_request")
        body["idempotency_key"] = header_key
    if isinstance(body.get("webhook"), str) and not webhook_url_problem(body["webhook"]):
        if problem := await target_problem(body["webhook"], request.app.state.settings.webhook_allow_private):
            raise ApiError(400, f"webhook {problem}", param="webhook", code="invalid_request")
    job_id = await client(request).submit(body, queue=QUEUES[queue], record_fields=tenant.record_fields)
    record = await owned_record(request, tenant, job_id)
    return JSONResponse({"job_id": job_id, "state": record.state.value}, status_code=202,
                        headers={"Location": f"/v1/jobs/{job_id}", "X-Job-Id": job_id})


@router.get("/v1/jobs/{job_id}")
async def get(request: Request, job_id: str, tenant: Tenant = Depends(authenticate)):
    return record_body(await owned_record(request, tenant, job_id))


@router.post("/v1/jobs/{job_id}/cancel")
async def cancel(request: Request, job_id: str, tenant: Tenant = Depends(authenticate)):
    await owned_record(request, tenant, job_id)
    outcome = await client(request).cancel(job_id)
    return {"job_id": job_id, "outcome": outcome.outcome, "description": outcome.description}


@router.get("/v1/jobs/{job_id}/events")
async def events(request: Request, job_id: str, cancel_on_disconnect: bool = False, tenant: Tenant = Depends(authenticate)):
    await owned_record(request, tenant, job_id)
    after = request.headers.get("last-event-id")

    async def follow():
        ended = False
        try:
            async for event_id, event in client(request).events(job_id, EVENTS_FOLLOW_S, after=after):
                ended = not isinstance(event, StreamChunk)
                yield {"id": event_id, "event": event.event, "data": event.model_dump_json()}
        except JobTimeoutError:
            ended = True
        finally:
            if not ended and cancel_on_disconnect:
                cancel_later(request, job_id)

    return EventSourceResponse(follow(), headers={"X-Job-Id": job_id}, ping=15)
