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


def test_a_submitted_message_is_the_one_celery_would_send_less_what_the_worker_does_not_read(new_database):
    """The producer's message is Celery's own ``send_task(belle.generate, kwargs={job_id})``, with only the headers
    and properties a worker reads, and its body not base64-encoded (a waiting job's message: about 400 bytes;
    its request is in its record)."""
    url = new_database()
    with JobClient(Settings(redis_url=url)) as client:
        job_id = client.submit({"prompt": "你好", "num_beams": 1}, queue="belle.compare")
        ours = json.loads(client.redis.lpop("belle.compare"))
    app = make_sender(Settings(redis_url=url))
    app.send_task(keys.TASK_GENERATE, kwargs={"job_id": job_id}, task_id=job_id, queue="belle.compare")
    app.close()
    raw = redis.Redis.from_url(url)
    celerys = json.loads(raw.lpop("belle.compare"))
    raw.close()
    assert json.loads(ours["body"]) == [[], {"job_id": job_id}, {}]
    args, kwargs, embed = json.loads(base64.b64decode(celerys["body"]))
    assert (args, kwargs) == ([], {"job_id": job_id}) and not any(embed.values())
    differ = {"ignore_result"}  # ours: results are never stored
    assert {k: v for k, v in ours["headers"].items() if k not in differ} == {k: celerys["headers"][k] for k in ours["headers"] if k not in differ}
    assert "你好" not in json.dumps(ours, ensure_ascii=False) and len(json.dumps(ours)) < 500
    for name in ("content-type", "content-encoding"):
        assert ours[name] == celerys[name]
    same = ("delivery_info", "priority")
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
