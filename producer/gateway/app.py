"""The HTTP gateway: a FastAPI app over ``AsyncJobClient``. It keeps no state of its own (everything is in
Redis), so any number of them can serve behind a load balancer; it imports neither the worker nor the
GPU stack.

``create_app()`` reads the settings (``BELLE_*``); ``belle-queue gateway`` serves it with uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from producer import keys
from producer.aio import AsyncJobClient
from producer.errors import JobNotFoundError
from producer.fleet_metrics import fleet_registry
from producer.gateway import batch_routes, errors, job_routes, openai_routes
from producer.gateway.auth import KeyRing
from producer.gateway.webhooks import WebhookDeliverer
from producer.presets import load_presets
from producer.settings import Settings, get_settings

log = logging.getLogger("belle.gateway")

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class GatewayMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("belle_gateway_requests", "HTTP requests, by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("belle_gateway_request_seconds", "Time to the response's headers, by route", ["route"], buckets=SECONDS, registry=r)
        self.open_streams = Gauge("belle_gateway_open_streams", "Server-sent event streams open now", registry=r)


async def webhook_payload(client: AsyncJobClient, kind: str, item_id: str, event: str) -> dict | None:
    """A webhook event's data, as read now: the job's record (as GET /v1/jobs/{id}; an output event of a
    job still running adds ``output``, its text per sequence so far), or the batch (as GET
    /v1/batches/{id} for an OpenAI batch); None once it is gone."""
    if kind == "job":
        try:
            record = await client.get(item_id)
        except JobNotFoundError:
            return None
        body = job_routes.record_body(record)
        if event == "output" and not record.is_final:
            body["output"] = await client.texts_so_far(item_id)
        return body
    fields = await client.redis.hgetall(keys.batch(item_id))
    if not fields:
        return None
    status = await client.batch_status(item_id)
    return batch_routes.openai_batch(status, fields) if fields.get("openai_endpoint") else status.model_dump(mode="json")


class Measured:
    """Counts requests by route and status, times them to their response's start, and counts open
    event streams (a plain ASGI middleware: nothing added to a stream's chunks)."""

    def __init__(self, app, metrics: GatewayMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, streaming = time.perf_counter(), False

        async def measured_send(message):
            nonlocal streaming
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.requests.labels(route, str(message["status"])).inc()
                self.metrics.latency.labels(route).observe(time.perf_counter() - started)
                streaming = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in message.get("headers", []))
                if streaming:
                    self.metrics.open_streams.inc()
            await send(message)

        try:
            await self.app(scope, receive, measured_send)
        finally:
            if streaming:
                self.metrics.open_streams.dec()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.client = client = AsyncJobClient(settings)
        app.state.fleet = fleet_registry(client.sync.redis, batch_series=settings.fleet_batch_series)  # (read at each scrape)
        if app.state.keyring.open:
            log.warning("no API key is configured (BELLE_API_KEYS, BELLE_API_KEYS_FILE): the gateway serves anyone who reaches it")
        stopping, delivering = asyncio.Event(), None
        if settings.webhook_deliver:
            deliverer = WebhookDeliverer(client, app.state.keyring, settings, functools.partial(webhook_payload, client))
            delivering = asyncio.create_task(deliverer.run(stopping))
        try:
            yield
        finally:
            stopping.set()
            if delivering is not None:
                await delivering
            await client.close()

    app = FastAPI(title="belle-queue gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.keyring = KeyRing(settings)
    app.state.presets = load_presets(settings)
    app.state.metrics = metrics = GatewayMetrics()
    errors.install(app, settings.redis_url)
    app.include_router(openai_routes.router)
    app.include_router(job_routes.router)
    app.include_router(batch_routes.router)

    app.add_middleware(Measured, metrics=metrics)

    @app.get("/health")
    async def health(request: Request):
        client = request.app.state.client
        try:
            await client.redis.ping()
            workers = await client.workers()
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "redis": f"unreachable: {exc}", "workers": 0, "models": []}, status_code=503,
                                headers={"Retry-After": str(errors.RETRY_AFTER_S)})
        models = sorted({w.model for w in workers})
        return {"status": "ok" if workers else "no_workers", "redis": "ok", "workers": len(workers), "models": models}

    @app.get("/metrics")
    async def prometheus(request: Request):
        """This process's own metrics, then the fleet's (producer/fleet_metrics.py: read from Redis now, on a thread)."""
        fleet = await asyncio.to_thread(generate_latest, request.app.state.fleet)
        return Response(generate_latest(metrics.registry) + fleet, media_type=CONTENT_TYPE_LATEST)

    return app
