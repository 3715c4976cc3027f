"""Webhooks from real gateways to a receiver on loopback: signed per Standard Webhooks, retried with the
same webhook-id, never lost when a deliverer dies mid-delivery, and refused to private addresses
unless allowed."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml

from producer import keys
from producer.client import JobClient
from producer.records import JobState
from producer.settings import Settings
from tests.waiting import wait_for

SECRET = "whsec_" + base64.b64encode(b"a secret of thirty-two bytes!!!!").decode()
KEY = "sk-webhooks-0123456789"
QUICK = {"prompt": "hi", "num_beams": 1, "max_new_tokens": 3}


class Receiver:
    """An HTTP receiver on loopback that records what it gets; it can fail a number of times first, or
    hold a request until released."""

    def __init__(self):
        self.received: list[dict] = []
        self.fail_first = 0
        self.hold = threading.Event()
        self.holding = threading.Event()
        self.hold.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                if not receiver.hold.is_set():
                    receiver.holding.set()
                    receiver.hold.wait(30)
                status = 500 if receiver.fail_first > 0 else 204
                receiver.fail_first -= 1
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, webhook_type: str | None = None) -> list[dict]:
        out = [json.loads(r["body"]) | {"_headers": r["headers"]} for r in self.received]
        return [e for e in out if webhook_type is None or e["type"] == webhook_type]

    def close(self):
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


def verify(headers: dict, body: bytes) -> bool:
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(base64.b64decode(SECRET.removeprefix("whsec_")), signed, hashlib.sha256).digest()).decode()
    return headers["webhook-signature"] == f"v1,{expected}"


@pytest.fixture(scope="module")
def setup(new_database, start_worker, bloom_config, tmp_path_factory):
    url = new_database()
    start_worker(bloom_config, name="webhooks@tests", redis_url=url)
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([{"key": KEY, "tenant": "hooks", "webhook_secret": SECRET}]))
    env = {"BELLE_API_KEYS_FILE": str(keys_file), "BELLE_WEBHOOK_ALLOW_PRIVATE": "1", "BELLE_WEBHOOK_TIMEOUT_S": "1"}
    with JobClient(Settings(redis_url=url)) as client:
        yield url, env, client


@pytest.fixture
def gateways(start_gateway):
    """Gateways for one test only: each is a deliverer, and one left running would take the next test's events."""
    started = []

    def start(url: str, env: dict[str, str]):
        started.append(start_gateway(url, env=env))
        return started[-1]

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def submit(gateway, body: dict) -> str:
    response = httpx.post(gateway.url + "/v1/jobs", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def test_start_and_completion_arrive_signed_and_a_failing_receiver_gets_the_same_id_again(setup, gateways, receiver):
    url, env, client = setup
    gateway = gateways(url, env=env)
    job_id = submit(gateway, {**QUICK, "webhook": receiver.url, "webhook_events_filter": ["start", "completed"]})
    wait_for(lambda: len(receiver.events("job.completed")) == 1, 60, lambda: f"the completion arrived: {receiver.events()}")
    started, completed = receiver.events("job.start"), receiver.events("job.completed")[0]
    assert started and started[0]["data"]["job_id"] == job_id
    assert completed["data"]["job_id"] == job_id and completed["data"]["state"] == "succeeded"
    assert completed["data"]["result"]["sequences"][0]["text"] == client.get(job_id).text
    assert all(verify(r["headers"], r["body"]) for r in receiver.received), "every delivery is signed with the tenant's secret"
    assert len({r["headers"]["webhook-id"] for r in receiver.received}) == 2, "one id per event"

    receiver.received.clear()
    receiver.fail_first = 2
    submit(gateway, {**QUICK, "webhook": receiver.url})
    wait_for(lambda: len(receiver.received) == 3, 60, lambda: f"three attempts: {[r['headers'] for r in receiver.received]}")
    assert len({r["headers"]["webhook-id"] for r in receiver.received}) == 1, "the same webhook-id on every attempt"
    assert all(verify(r["headers"], r["body"]) for r in receiver.received)


def test_output_events_carry_the_text_so_far_then_the_whole_text(setup, gateways, receiver):
    url, env, client = setup
    gateway = gateways(url, env=env)
    streamed = submit(gateway, {"prompt": "tell", "num_beams": 1, "do_sample": True, "seed": 3, "max_new_tokens": 24, "stream": True,
                                "webhook": receiver.url, "webhook_events_filter": ["output", "completed"]})
    plain = submit(gateway, {**QUICK, "webhook": receiver.url, "webhook_events_filter": ["output"]})
    wait_for(lambda: len(receiver.events("job.completed")) == 1 and any(e["data"]["job_id"] == plain for e in receiver.events("job.output")), 60,
             lambda: f"both jobs' events arrived: {[e['type'] for e in receiver.events()]}")
    record = client.get(streamed)
    assert record.state is JobState.SUCCEEDED and client.redis.xlen(keys.job_chunks(streamed)) > 1, "the job streamed"
    outputs = [e["data"] for e in receiver.events("job.output") if e["data"]["job_id"] == streamed]
    assert len(outputs) >= 2, "one with the first chunk, one at the end"
    for data in outputs:  # read at delivery: the text so far while it ran, the whole result once it had ended
        text = data["output"][0] if data["state"] == "running" else data["result"]["sequences"][0]["text"]
        assert record.text.startswith(text)
    assert any(d["state"] == "succeeded" and d["result"]["sequences"][0]["text"] == record.text for d in outputs)
    plain_events = [e for e in receiver.events() if e["data"]["job_id"] == plain]
    assert [e["type"] for e in plain_events] == ["job.output"], "a job that does not stream: one output event, at its end; no completion asked"
    assert plain_events[0]["data"]["result"]["sequences"][0]["text"] == client.get(plain).text


def test_a_deliverer_killed_mid_delivery_loses_nothing(setup, gateways, receiver):
    url, env, client = setup
    first = gateways(url, env=env)
    receiver.hold.clear()  # the first delivery hangs
    job_id = submit(first, {**QUICK, "webhook": receiver.url})
    assert receiver.holding.wait(60), "the delivery reached the receiver"
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    receiver.hold.set()
    second = gateways(url, env=env)  # claims what the dead one held, once it has been idle past twice the timeout
    wait_for(lambda: len(receiver.received) >= 2, 60, lambda: f"the event came again from the other deliverer; its log:\n{second.log[-3000:]}")
    ids = {r["headers"]["webhook-id"] for r in receiver.received}
    assert len(ids) == 1 and json.loads(receiver.received[-1]["body"])["data"]["job_id"] == job_id
    assert second.process.poll() is None


def test_a_private_target_is_refused_unless_allowed(setup, gateways, receiver):
    url, env, _ = setup
    strict = gateways(url, env={**env, "BELLE_WEBHOOK_ALLOW_PRIVATE": "0", "BELLE_WEBHOOK_DELIVER": "0"})
    response = httpx.post(strict.url + "/v1/jobs", json={**QUICK, "webhook": receiver.url}, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "webhook"
    assert "not a public address" in response.json()["error"]["message"]
    for bad in ("ftp://example.com/x", "http://user:pw@example.com/x"):
        refused = httpx.post(strict.url + "/v1/jobs", json={**QUICK, "webhook": bad}, headers={"Authorization": f"Bearer {KEY}"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "webhook"


def test_a_batch_says_when_it_has_completed(setup, gateways, receiver, tmp_path):
    url, env, client = setup
    gateway = gateways(url, env=env)
    headers = {"Authorization": f"Bearer {KEY}"}
    lines = "".join(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"model": "tiny-bloom", "prompt": f"q{i}", "max_tokens": 3}}) + "\n" for i in range(5))
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as http:
        file_id = http.post("/v1/files", files={"file": ("b.jsonl", lines.encode())}, data={"purpose": "batch"}).json()["id"]
        batch = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h",
                                               "webhook": receiver.url, "webhook_events_filter": ["start", "completed"]}).json()
        refused = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions", "webhook": receiver.url,
                                                 "webhook_events_filter": ["output"]})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "webhook_events_filter"
    wait_for(lambda: receiver.events("batch.completed"), 60, lambda: f"the batch's completion arrived: {receiver.events()}")
    (event,) = receiver.events("batch.completed")
    (start,) = receiver.events("batch.start")
    assert start["data"]["id"] == batch["id"] and start["data"]["request_counts"]["total"] == 5
    assert event["data"]["id"] == batch["id"] and event["data"]["status"] == "completed" and event["data"]["request_counts"]["completed"] == 5
    assert event["data"]["completed_at"] and verify(event["_headers"], receiver.received[-1]["body"])
    assert all(client.get(j).state is JobState.SUCCEEDED for j in client.redis.lrange(f"belle:batch:{batch['id']}:jobs", 0, -1))
