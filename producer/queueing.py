"""The Celery configuration the producer and the worker share.

The producer writes its messages itself (producer/enqueue.py: the same messages Celery would send,
with the job's record, in one script); ``make_sender`` is a Celery app with this configuration and no
tasks, for tools that talk Celery (an event receiver, a raw ``send_task``).
"""

from __future__ import annotations

from typing import Any

from producer import keys
from producer.redis_url import is_sentinel_url, parse_sentinel_url
from producer.sentinel_transport import SentinelListTransport
from producer.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings that the producer and the worker must agree on."""
    broker_url, sentinel_options, broker_use_ssl, sentinel = settings.redis_url, {}, None, {}
    if is_sentinel_url(settings.redis_url):
        broker_url, sentinel_options, broker_use_ssl = parse_sentinel_url(settings.redis_url).kombu()
        sentinel = {"broker_transport": SentinelListTransport, **({"broker_use_ssl": broker_use_ssl} if broker_use_ssl else {})}
    return {
        "broker_url": broker_url,
        **sentinel,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            **sentinel_options,
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": settings.unacked_restore_throttle,
            # A worker takes from its queues in the order given (interactive first), not in turn.
            "queue_order_strategy": "priority",
        },
        # Task events, so that Flower (or `celery events`) can follow jobs: off unless asked for (BELLE_TASK_EVENTS),
        # as they cost every job about 2 ms on its way (BENCHMARKS.md, Latency).
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
        # JSON only: pickle (or anything else) on the queue is refused, never deserialised.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_serializer": "json",
        # Results live in our own job records, not in a Celery result backend.
        "task_ignore_result": True,
        "task_default_queue": keys.QUEUE_INTERACTIVE,
        "task_create_missing_queues": True,
    }


def make_sender(settings: Settings):
    from celery import Celery

    app = Celery("belle-producer", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
