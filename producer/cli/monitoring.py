"""The monitoring commands: ``exporter`` serves the fleet metrics (producer/fleet_metrics.py) for deployments
without the gateway, and ``health`` checks a worker's announcement and liveness (a container healthcheck:
exit 0 healthy, 1 not, 4 Redis unreachable)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from producer.cli.common import EXIT_FAILED, EXIT_OK, seconds

EXPORTER_PORT = 9390  # (the worker's metrics in docker-compose: 9400; node_exporter's 9100 stays free)
INSTALL_HINT = "the exporter needs prometheus-client: pip install 'belle-queue[gateway]' (or pip install prometheus-client)"


def register(sub, settings_of: Callable[[argparse.Namespace], object]) -> None:
    """Add the commands to the parser's subcommands; ``settings_of(args)``: the settings (with --redis-url)."""
    p = sub.add_parser("exporter", help="serve the fleet metrics (queue depth, oldest wait, jobs ended, workers, batches) for Prometheus")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=EXPORTER_PORT, help=f"port (default {EXPORTER_PORT}); the path is /metrics")
    p.set_defaults(func=lambda args: cmd_exporter(args, settings_of(args)))

    p = sub.add_parser("health", help="exit 0 when the worker's announcement is live and fresh and its process is alive (a healthcheck), else 1")
    p.add_argument("--worker", metavar="NAME", help="its node name, as given to `worker --name` (%%h: this host's name); default: any live worker")
    p.add_argument("--max-age", type=seconds, metavar="SECONDS", help="oldest heartbeat taken as live (default: the announcement's expiry, 6 s)")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=lambda args: cmd_health(args, settings_of(args)))


def cmd_exporter(args: argparse.Namespace, settings) -> int:
    import signal
    import threading

    try:
        from prometheus_client import start_http_server

        from producer.fleet_metrics import fleet_registry
    except ImportError:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_FAILED
    from producer.connection import redis_client
    from producer.settings import masked_url

    redis = redis_client(settings.redis_url)
    server, thread = start_http_server(args.port, addr=args.host, registry=fleet_registry(redis, batch_series=settings.fleet_batch_series))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    print(f"fleet metrics of {masked_url(settings.redis_url)} at http://{args.host}:{server.server_port}/metrics", flush=True)
    try:
        while not stopping.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        redis.close()
    return EXIT_OK


def cmd_health(args: argparse.Namespace, settings) -> int:
    from celery.utils.nodenames import host_format

    from producer.connection import redis_client
    from producer.fleet import EXPIRES_S, worker_health

    max_age = args.max_age if args.max_age is not None else EXPIRES_S
    name = host_format(args.worker) if args.worker else None
    redis = redis_client(settings.redis_url)
    try:
        health = worker_health(redis, name, max_age_s=max_age)
    finally:
        redis.close()
    if args.json:
        print(json.dumps({"healthy": health.healthy, "worker": health.worker, "detail": health.detail}))
    elif health.healthy:
        print(f"ok: {health.detail}")
    else:
        print(f"unhealthy: {health.detail}", file=sys.stderr)
    return EXIT_OK if health.healthy else EXIT_FAILED
