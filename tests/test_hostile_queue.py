"""Whatever is pushed onto a queue, a worker stays up, nothing stays in its hands or comes back, and no
record is touched except the ones the entries name. Unit tests of the checks (worker/serving/intake.py) and a
property-based test that pushes random entries into the real queue of a real worker."""

from __future__ import annotations

import base64
import json

import pytest
import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from producer import keys
from producer.client import JobClient
from producer.enqueue import new_job_id, task_message
from producer.records import JobState
from producer.settings import Settings
from producer.store import canonical_json
from tests.test_reliability import FAST_REDELIVERY
from tests.waiting import stays, wait_for
from worker.serving.intake import envelope_problem, task_problem

QUEUE = keys.QUEUE_INTERACTIVE
MAX_MESSAGE_BYTES = 64 * 1024
VALID = {"prompt": "hi", "num_beams": 1, "max_new_tokens": 2}


def envelope(job_id: str, request=VALID, queue: str = QUEUE) -> dict:
    """A message as an earlier version (and Celery's own ``send_task``) writes it: carrying its request, its
    body base64-encoded (what the tests below change)."""
    message = json.loads(task_message(job_id, request, queue))
    message["body"] = base64.b64encode(message["body"].encode()).decode()
    message["properties"]["body_encoding"] = "base64"
    return message


def body_of(message: dict):
    return json.loads(base64.b64decode(message["body"]))


def check_task(message: dict) -> str | None:
    return task_problem(message["headers"], message["content-type"], message["content-encoding"], lambda: body_of(message))


# --- the checks alone ---

def test_the_producers_own_message_passes_both_checks():
    message = envelope(new_job_id())
    assert envelope_problem(message) is None and check_task(message) is None
    own = json.loads(task_message(new_job_id(), None, QUEUE))  # (naming the job only, its body not base64-encoded)
    assert envelope_problem(own) is None
    assert task_problem(own["headers"], own["content-type"], own["content-encoding"], lambda: json.loads(own["body"])) is None


@pytest.mark.parametrize("raw", [None, 5, "abc", [1], {"a": 1}, {"properties": []}, {"properties": {"delivery_tag": 5, "delivery_info": {}}}])
def test_what_is_not_an_envelope_is_named(raw):
    assert envelope_problem(raw) is not None


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda m: m["headers"].update(task="celery.chord_unlock"), "'celery.chord_unlock' is not served here"),
    (lambda m: m["headers"].update(task="celery.backend_cleanup"), "is not served here"),
    (lambda m: m.update(headers=None), "no task headers"),
    (lambda m: m["headers"].update(id="../x"), "id header is not a job id"),
    (lambda m: m["headers"].update(eta="2999-01-01T00:00:00"), "eta header is set"),
    (lambda m: m["headers"].update(expires="2000-01-01T00:00:00"), "expires header is set"),
    (lambda m: m["headers"].update(timelimit=[1, 2]), "timelimit header is set"),
    (lambda m: m.update({"content-type": "application/x-python-serialize"}), "messages must be JSON"),
    (lambda m: m.update(body=base64.b64encode(json.dumps({"a": 1}).encode()).decode()), "not [args, kwargs, embed] (got dict)"),
    (lambda m: m.update(body=base64.b64encode(json.dumps([[], {}, {}, 1]).encode()).decode()), "(got list of 4)"),
    (lambda m: m.update(body=base64.b64encode(json.dumps([[], {}, 5]).encode()).decode()), "embed (an object)"),
    (lambda m: m.update(body=base64.b64encode(b"\xff\xfe not json").decode()), "body could not be read"),
    (lambda m: m.update(body=base64.b64encode(json.dumps([[], {"job_id": m["headers"]["id"]}, {"chain": [{"task": "x"}]}]).encode()).decode()),
     "callbacks, errbacks, a chain or a chord"),
    (lambda m: m.update(body=base64.b64encode(json.dumps([[], {"job_id": "other"}, None]).encode()).decode()), "differs from its id header"),
])
def test_what_is_not_a_job_message_is_named(change, fragment):
    message = envelope(new_job_id())
    change(message)
    problem = check_task(message)
    assert problem is not None and fragment in problem, problem


# --- random entries on the real queue of a real worker ---

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
task_names = st.sampled_from([keys.TASK_GENERATE, keys.TASK_GENERATE, "celery.chord_unlock", "celery.backend_cleanup", "celery.chain",
                              "celery.group", "celery.map", "evil.shell"]) | st.text(max_size=30) | st.none() | st.integers()
requests = st.one_of(
    st.just(VALID),
    st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=40), "num_beams": st.just(1), "max_new_tokens": st.integers(1, 3)}),
    st.builds(lambda n: {**VALID, "prompt": "x" * n}, st.integers(1, 2 * MAX_MESSAGE_BYTES)),  # sizes up to past the limit
    json_values,
)


@st.composite
def entries(draw, existing: list[str]) -> tuple[bytes, set[str]]:
    """A queue entry, and the job ids it names."""
    kind = draw(st.sampled_from(["job", "job", "job", "body", "headers", "envelope", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)), set()
    job_id = draw(st.sampled_from([new_job_id(), new_job_id(), *existing]) | st.text(max_size=70))
    message = envelope(job_id if isinstance(job_id, str) and keys.ID.match(job_id) else new_job_id(), draw(requests))
    message["headers"]["id"] = job_id
    message["headers"]["task"] = draw(task_names)
    kwargs = {"job_id": job_id, "request": draw(requests)}
    if kind == "body":
        body = draw(st.one_of(json_values, st.just([[], kwargs, None]), st.tuples(json_values, st.just(kwargs), json_values).map(list)))
        raw = draw(st.sampled_from(["json", "json", "binary", "not-base64"]))
        encoded = json.dumps(body).encode() if raw == "json" else draw(st.binary(max_size=100))
        message["body"] = base64.b64encode(encoded).decode() if raw != "not-base64" else draw(st.text(max_size=50))
        message["content-type"] = draw(st.sampled_from(["application/json", "application/json", "application/x-python-serialize",
                                                        "application/x-yaml", "text/plain", "", None]))
        message["content-encoding"] = draw(st.sampled_from(["utf-8", "utf-8", "binary", "latin-1", None]))
    elif kind == "headers":
        for name in draw(st.lists(st.sampled_from(["eta", "expires", "timelimit", "group", "chord", "retries", "stamped_headers", "lang",
                                                   "root_id", "parent_id", "shadow", "argsrepr"]), max_size=4)):
            message["headers"][name] = draw(json_values)
        if draw(st.booleans()):
            message["headers"] = draw(json_values)
    elif kind == "envelope":
        target = draw(st.sampled_from(["properties", "delivery_tag", "delivery_info", "priority", "body_encoding", "routing_key", "whole"]))
        if target == "properties":
            message["properties"] = draw(json_values)
        elif target == "delivery_info":
            message["properties"]["delivery_info"] = draw(json_values)
        elif target == "routing_key":
            message["properties"]["delivery_info"]["routing_key"] = draw(json_values)
        elif target == "whole":
            message = draw(json_values)
        else:
            message["properties"][target] = draw(json_values)
    names = {i for i in (job_id, kwargs["job_id"]) if isinstance(i, str)}
    return json.dumps(message).encode(), names


@pytest.fixture(scope="module")
def hostile_setup(new_database, start_worker, bloom_config):
    url = new_database()
    worker = start_worker(bloom_config, name="hostile@tests", redis_url=url, env={**FAST_REDELIVERY, "BELLE_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES)})
    with JobClient(Settings(redis_url=url)) as client:
        existing = [client.submit(VALID) for _ in range(2)]
        for job_id in existing:
            client.wait(job_id, 60)
        yield client, worker, existing


def drained(client: JobClient) -> bool:
    return not any(client.redis.llen(queue) for queue in keys.QUEUES) and not client.redis.hlen(keys.UNACKED)


def test_random_entries_on_the_queue_leave_the_worker_serving_and_nothing_in_hand(hostile_setup):
    client, worker, existing = hostile_setup
    before = {job_id: client.redis.hgetall(keys.job(job_id)) for job_id in existing}
    raw = redis.Redis.from_url(client.settings.redis_url)  # bytes in, as anything could push them
    named_in_all: set[str] = set()

    # No shrinking: each try of a failing example waits out its deadline; the example is reported as found.
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(st.lists(entries(existing), min_size=1, max_size=4))
    def pushing(batch):
        for entry, _ in batch:
            raw.lpush(QUEUE, entry)
        named = set().union(*(names for _, names in batch))
        named_in_all.update(named)
        wait_for(lambda: drained(client), 30, lambda: f"the queue and unacked drain (queue {client.redis.llen(QUEUE)}, "
                                                        f"unacked {client.redis.hlen(keys.UNACKED)}); log:\n{worker.log[-3000:]}")
        assert worker.alive(), worker.log[-4000:]
        # Two entries of one batch may name the same job: the queue can drain while one copy still runs (the other
        # waits to go back), so the records are waited for, not read once.
        named_jobs = [job_id for job_id in named - set(existing) if keys.ID.match(job_id)]

        def unfinished() -> list:
            return [(job_id, record.state) for job_id in named_jobs if (record := client.store.get(job_id)) is not None and not record.state.is_final]

        wait_for(lambda: not unfinished(), 30, lambda: f"the named jobs' records end final: {unfinished()}")
        # A copy that went back to the queue while its job ran comes round once more, and is acknowledged then.
        wait_for(lambda: drained(client), 30, lambda: f"the copies sent back drain (queue {client.redis.llen(QUEUE)}, "
                                                      f"unacked {client.redis.hlen(keys.UNACKED)})")

    pushing()
    raw.close()
    # Nothing comes back after the visibility timeout (4 s here; the restore sweep looks every second).
    stays(lambda: drained(client), 6, lambda: f"nothing was redelivered: queue {client.redis.lrange(QUEUE, 0, -1)!r:.600}, "
                                              f"unacked {client.redis.hgetall(keys.UNACKED)!r:.600}; log:\n{worker.log[-3000:]}")
    assert worker.alive()
    assert {job_id: client.redis.hgetall(keys.job(job_id)) for job_id in existing} == before, "existing records untouched"
    # Records were made only for ids the entries named.
    made = {k.removeprefix(keys.job("")) for k in client.redis.scan_iter(match=keys.job("*")) if ":" not in k.removeprefix(keys.job(""))}
    assert made - set(existing) <= named_in_all, {j: client.redis.hgetall(keys.job(j)) for j in list(made - set(existing) - named_in_all)[:3]}
    after = client.submit(VALID)
    assert client.wait(after, 60).state is JobState.SUCCEEDED
    refused, dropped = worker.log.count("rejected a message"), worker.log.count("dropped an entry")
    assert refused and dropped, "the entries reached both checks"
    print(f"{len(named_in_all)} job ids named; {refused} messages rejected, {dropped} entries dropped")


def test_what_lies_under_a_jobs_key_that_is_not_a_record_of_ours_does_not_make_its_message_loop(hostile_setup):
    """A key of another type, or a hash with fields that are not ours: Redis refuses the scripts for good,
    so the message is acknowledged (and the job failed where its record can be written), not
    delivered again and again."""
    client, worker, _ = hostile_setup
    not_a_hash, not_our_fields = new_job_id(), new_job_id()
    client.redis.set(keys.job(not_a_hash), "a string, not a record")
    client.redis.hset(keys.job(not_our_fields), mapping={"state": "queued", "attempts": "many", "request": canonical_json(VALID)})
    for job_id in (not_a_hash, not_our_fields):
        client.redis.lpush(QUEUE, task_message(job_id, VALID, QUEUE))
    wait_for(lambda: drained(client), 30, lambda: f"both messages were acknowledged; log:\n{worker.log[-3000:]}")
    stays(lambda: drained(client), 6, "neither came back")
    assert worker.alive()
    assert client.redis.get(keys.job(not_a_hash)) == "a string, not a record"
    assert f"job {not_a_hash}: Redis refused to handle its record" in worker.log
    record = client.redis.hgetall(keys.job(not_our_fields))
    assert record["state"] == "failed" and "Redis refused an operation on the job's record" in record["error"]
