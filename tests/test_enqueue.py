"""Enqueueing: the messages are Celery's own, the record and message go together, idempotency keys."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from producer import keys
from producer.client import JobClient
from producer.errors import InvalidRequestError
from producer.queueing import make_sender
from producer.records import JobState
from producer.settings import Settings


def test_a_submitted_message_is_the_one_celery_would_send(new_database):
    url = new_database()
    with JobClient(Settings(redis_url=url)) as client:
        job_id = client.submit({"prompt": "你好", "num_beams": 1}, queue="belle.compare")
        ours = json.loads(client.redis.lpop("belle.compare"))
        wire = client.get(job_id).request
    app = make_sender(Settings(redis_url=url))
    app.send_task(keys.TASK_GENERATE, kwargs={"job_id": job_id, "request": wire}, task_id=job_id, queue="belle.compare")
    app.close()
    raw = redis.Redis.from_url(url)
    celerys = json.loads(raw.lpop("belle.compare"))
    raw.close()
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(base64.b64decode(celerys["body"]))
    differ = {"origin", "kwargsrepr", "ignore_result"}  # ours: no prompt in what Flower shows; results are never stored
    assert {k: v for k, v in ours["headers"].items() if k not in differ} == {k: v for k, v in celerys["headers"].items() if k not in differ}
    assert ours["headers"]["kwargsrepr"] == f"{{'job_id': '{job_id}'}}"
    for name in ("content-type", "content-encoding"):
        assert ours[name] == celerys[name]
    same = ("correlation_id", "delivery_mode", "delivery_info", "priority", "body_encoding")
    assert {k: ours["properties"][k] for k in same} == {k: celerys["properties"][k] for k in same}


def test_the_same_idempotency_key_gives_the_same_job_and_enqueues_nothing(new_database):
    url = new_database()
    with JobClient(Settings(redis_url=url)) as client:
        request = {"prompt": "charge the card once", "num_beams": 1, "idempotency_key": "order-17"}
        first = client.submit(request)
        again = client.submit(request)
        assert again == first and client.redis.llen(keys.QUEUE_INTERACTIVE) == 1
        assert client.submit({"prompt": "charge the card once", "num_beams": 1}) != first, "no key, a new job"
        with pytest.raises(InvalidRequestError, match="idempotency_key 'order-17' was already used for a different request"):
            client.submit({**request, "prompt": "something else"})
        assert client.get(first).state is JobState.QUEUED
