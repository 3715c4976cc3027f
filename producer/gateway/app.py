"""The HTTP gateway: a FastAPI app over ``AsyncJobClient``. It keeps no state of its own (everything is in
Redis), so any number of them can serve behind a load balancer; it imports neither the worker nor the
GPU stack.

``create_app()`` reads the settings (``BELLE_*``); ``belle-queue gateway`` serves it with uvicorn.
"""

from __future__ import annotations

import contextlib
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from producer.aio import AsyncJobClient
from producer.gateway import batch_routes, errors, job_routes, openai_routes
from producer.gateway.auth import KeyRing
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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.client = AsyncJobClient(settings)
        if app.state.keyring.open:
            log.warning("no API key is configured (BELLE_API_KEYS, BELLE_API_KEYS_FILE): the gateway serves anyone who reaches it")
        try:
            yield
        finally:
            await app.state.client.close()

    app = FastAPI(title="belle-queue gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.keyring = KeyRing(settings)
    app.state.presets = load_presets(settings)
    app.state.metrics = metrics = GatewayMetrics()
    errors.install(app, settings.redis_url)
    app.include_router(openai_routes.router)
    app.include_router(job_routes.router)
    app.include_router(batch_routes.router)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        metrics.requests.labels(name, str(response.status_code)).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - started)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            metrics.open_streams.inc()
            iterator = response.body_iterator

            async def counted():
                try:
                    async for part in iterator:
                        yield part
                finally:
                    metrics.open_streams.dec()

            response.body_iterator = counted()
        return response

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
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
