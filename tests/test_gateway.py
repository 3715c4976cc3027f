"""The HTTP gateway with real processes: a redis-server, a worker, a uvicorn gateway on a free port; the
official `openai` client (sync and async) and httpx against it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import jsonschema
import openai
import pytest
import yaml

from producer.client import JobClient
from producer.records import JobState
from producer.settings import Settings
from tests.waiting import wait_for

MODEL = "tiny-bloom-long"
KEY_A, KEY_B = "sk-tenant-a-0123456789", "sk-tenant-b-9876543210"


@pytest.fixture(scope="module")
def stack(new_database, start_worker, start_gateway, tmp_path_factory, tiny_bloom):
    """A worker with a long context window (so that a long job lasts), and two gateways: one open, one
    with API keys (tenant b limited to 5 requests a minute)."""
    url = new_database()
    config = tmp_path_factory.mktemp("configs") / f"{MODEL}.yaml"
    config.write_text(yaml.safe_dump({"name": MODEL, "path": str(tiny_bloom), "context_length": 4096}))
    worker = start_worker(config, name="gateway@tests", redis_url=url)
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([{"key": KEY_A, "tenant": "team-a"}, {"key": KEY_B, "tenant": "team-b", "rate_per_minute": 5}]))
    open_gateway = start_gateway(url)
    keyed_gateway = start_gateway(url, env={"BELLE_API_KEYS_FILE": str(keys_file)})
    with JobClient(Settings(redis_url=url)) as client:
        yield open_gateway, keyed_gateway, client, worker


def oa(gateway, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def test_the_openai_client_chats_and_completes_and_the_text_is_the_jobs(stack):
    gateway, _, client, _ = stack
    api = oa(gateway)
    reply = api.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}],
                                        max_tokens=12, temperature=0)
    record = client.get(reply.id)
    assert record.state is JobState.SUCCEEDED and reply.choices[0].message.content == record.text
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens == record.result.usage.completion_tokens
    assert reply.model == MODEL and reply.object == "chat.completion"
    assert record.request["messages"][0] == {"role": "system", "content": "be brief"} and record.request["do_sample"] is False

    two = api.completions.create(model=MODEL, prompt="Hello", max_tokens=6, n=2, seed=3)
    assert [c.index for c in two.choices] == [0, 1] and all(isinstance(c.text, str) for c in two.choices)
    assert [c.text for c in two.choices] == [s.text for s in client.get(two.id).result.sequences]

    free = api.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=30, temperature=0).choices[0].text
    stop = next((word for word in free.split() if len(word) > 1), None)
    assert stop, "control: a visible stop string from the free text"
    cut = api.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=30, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and free.startswith(cut.text)


def test_a_streamed_chat_is_the_jobs_text_in_chunks_and_ends_with_done(stack):
    gateway, _, client, _ = stack
    stream = oa(gateway).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}, temperature=0)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    record = client.get(chunks[0].id)
    assert record.request["stream"] is True and text == record.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [{"eos": "stop", "stop": "stop", "length": "length"}[record.result.sequences[0].finish_reason.value]]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == record.result.usage.total_tokens


def test_invalid_and_unsupported_parameters_are_bad_requests_that_name_them(stack):
    gateway, _, _, _ = stack
    api = oa(gateway)
    message = [{"role": "user", "content": "hi"}]
    for extra, param in [({"temperature": 5}, "temperature"), ({"top_p": 0}, "top_p"), ({"logit_bias": {"1": 2}}, "logit_bias"),
                         ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"response_format": {"type": "xml"}}, "response_format.type")]:
        with pytest.raises(openai.BadRequestError) as refused:
            api.chat.completions.create(model=MODEL, messages=message, max_tokens=4, **extra)
        assert refused.value.body["param"] == param, refused.value.body
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi", "name": "x"}], max_tokens=4)
    assert refused.value.body["param"] == "messages[0].name"
    with pytest.raises(openai.InternalServerError) as unserved:  # 503: no live worker serves it
        api.chat.completions.create(model="gpt-4o", messages=message, max_tokens=4)
    assert unserved.value.status_code == 503 and "tiny-bloom-long" in str(unserved.value)
    assert unserved.value.response.headers["retry-after"]


def test_belle_parameters_pass_as_extra_body_fields_and_models_are_the_workers(stack):
    gateway, _, client, _ = stack
    api = oa(gateway)
    reply = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                        extra_body={"num_beams": 2, "do_sample": False, "repetition_penalty": 1.3, "min_new_tokens": 3})
    request = client.get(reply.id).request
    assert (request["num_beams"], request["repetition_penalty"], request["min_new_tokens"]) == (2, 1.3, 3)
    assert [m.id for m in api.models.list().data] == [MODEL]


def test_response_format_with_a_json_schema_through_the_openai_client(stack):
    gateway, _, client, _ = stack
    api = oa(gateway)
    schema = {"type": "object", "properties": {"answer": {"enum": ["red", "green", "blue"]}, "score": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["answer", "score"], "additionalProperties": False}
    reply = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick a colour and rate it."}], max_tokens=80, temperature=0,
                                        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema, "strict": True}})
    value = json.loads(reply.choices[0].message.content)
    jsonschema.validate(value, schema)
    assert reply.choices[0].finish_reason == "stop" and client.get(reply.id).request["response_format"]["json_schema"]["name"] == "pick"
    choice = api.completions.create(model=MODEL, prompt="Yes or no?", max_tokens=8, temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].text in ("yes", "no")
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                    response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}})
    assert refused.value.body["param"] == "response_format.json_schema.schema" and "'not'" in refused.value.body["message"]


def test_logprobs_name_each_token_by_its_text_and_id(stack):
    gateway, _, client, _ = stack
    api = oa(gateway)
    chat = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, logprobs=True, temperature=0,
                                       extra_body={"min_new_tokens": 8})
    sequence = client.get(chat.id).result.sequences[0]
    content = chat.choices[0].logprobs.content
    assert [t.token for t in content] == sequence.tokens and len(content) == len(sequence.token_ids) == 8
    assert all(t.logprob <= 0 and t.bytes == list(t.token.encode()) for t in content) and any(t.token for t in content)
    text = api.completions.create(model=MODEL, prompt="hi", max_tokens=8, logprobs=0, temperature=0, extra_body={"min_new_tokens": 8})
    logprobs = text.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 8
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(8)]


def test_the_async_openai_client(stack):
    gateway, _, client, _ = stack

    async def scenario():
        api = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        replies = await asyncio.gather(*(api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=5)
                                         for i in range(4)))
        stream = await api.completions.create(model=MODEL, prompt="hi", max_tokens=8, stream=True)
        text = "".join([c.choices[0].text async for c in stream])
        await api.close()
        return replies, text, stream

    replies, text, _ = asyncio.run(scenario())
    assert all(client.get(r.id).text == r.choices[0].message.content for r in replies)
    assert isinstance(text, str)


def events(response: httpx.Response) -> list[tuple[str, str, dict]]:
    """(id, event, data) of a server-sent events response read whole."""
    out, current = [], {}
    for line in response.iter_lines():
        if not line:
            if "data" in current:
                out.append((current.get("id", ""), current.get("event", "message"), json.loads(current["data"])))
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            current[name] = value.removeprefix(" ")
    return out


def test_the_native_job_api_submits_reads_follows_resumes_and_cancels(stack):
    gateway, _, client, _ = stack
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        created = http.post("/v1/jobs", json={"prompt": "a long answer", "num_beams": 1, "max_new_tokens": 60, "stream": True},
                            headers={"Idempotency-Key": "native-1"})
        assert created.status_code == 202 and created.headers["location"] == f"/v1/jobs/{created.json()['job_id']}"
        job_id = created.json()["job_id"]
        again = http.post("/v1/jobs", json={"prompt": "a long answer", "num_beams": 1, "max_new_tokens": 60, "stream": True},
                          headers={"Idempotency-Key": "native-1"})
        assert again.json()["job_id"] == job_id, "the same key, the same job"
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            everything = events(response)
        record = client.wait(job_id, 60)
        chunks = [data for _, kind, data in everything if kind == "chunk"]
        assert everything[-1][1] == "end" and everything[-1][2]["state"] == "succeeded"
        assert "".join(c["text"] for c in chunks) == record.text and [c["seq"] for c in chunks] == list(range(len(chunks)))
        # Late, after the end: the whole stream again; and resumed after the second event: the rest only.
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            assert events(response) == everything
        with http.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": everything[1][0]}) as response:
            assert events(response) == everything[2:]
        body = http.get(f"/v1/jobs/{job_id}").json()
        assert body["state"] == "succeeded" and body["result"]["sequences"][0]["text"] == record.text and "tenant" not in body

        plain = http.post("/v1/jobs", json={"prompt": "no stream", "num_beams": 1, "max_new_tokens": 4}).json()["job_id"]
        with http.stream("GET", f"/v1/jobs/{plain}/events") as response:
            kinds = [(event_id, kind) for event_id, kind, _ in events(response)]
        assert kinds[-1] == ("r-end", "end") and all(event_id.startswith("r-") for event_id, _ in kinds)

        long = http.post("/v1/jobs", json={"prompt": "go on", "num_beams": 1, "max_new_tokens": 2000, "min_new_tokens": 100}).json()["job_id"]
        cancelled = http.post(f"/v1/jobs/{long}/cancel").json()
        assert cancelled["outcome"] in ("cancelled", "requested_held", "requested")
        assert client.wait(long, 60).state is JobState.CANCELLED
        assert http.get("/v1/jobs/no-such-job").status_code == 404


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/jobs/{job}/events?cancel_on_disconnect=true"])
def test_a_caller_that_disconnects_mid_stream_cancels_its_job(stack, path):
    gateway, _, client, _ = stack
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        if path.startswith("/v1/chat"):
            request = http.build_request("POST", path, json={"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "stream": True,
                                                             "max_tokens": 2000, "min_new_tokens": 100, "temperature": 0})
        else:
            job = http.post("/v1/jobs", json={"prompt": "go on", "num_beams": 1, "max_new_tokens": 2000, "min_new_tokens": 100, "stream": True})
            request = http.build_request("GET", path.format(job=job.json()["job_id"]))
        response = http.send(request, stream=True)
        job_id = response.headers["x-job-id"]
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:")), "a first chunk came"
        response.close()  # the caller goes away
    record = client.wait(job_id, 60)
    assert record.state is JobState.CANCELLED and record.result.sequences[0].finish_reason.value == "cancelled"
    assert len(record.result.sequences[0].token_ids) < 2000


def test_keys_tenants_and_rates(stack):
    _, gateway, client, _ = stack
    with pytest.raises(openai.AuthenticationError):
        oa(gateway, "sk-wrong").models.list()
    assert httpx.get(gateway.url + "/v1/models").status_code == 401
    a, b = (httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) for key in (KEY_A, KEY_B))
    with a, b:
        job_id = a.post("/v1/jobs", json={"prompt": "mine", "num_beams": 1, "max_new_tokens": 3}).json()["job_id"]
        assert client.get(job_id).tenant == "team-a"
        assert a.get(f"/v1/jobs/{job_id}").status_code == 200
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events"):
            assert b.get(path).status_code == 404, "another tenant's job does not exist for b"
        assert b.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
        same_key = [c.post("/v1/jobs", json={"prompt": "same key", "num_beams": 1, "max_new_tokens": 2}, headers={"Idempotency-Key": "k1"})
                    .json()["job_id"] for c in (a, b)]
        assert same_key[0] != same_key[1], "two tenants' idempotency keys never meet"
        # 5 requests a minute: of 6 more, one at least is refused, whichever minute they fall in.
        limited = [r for r in (b.get("/v1/models") for _ in range(6)) if r.status_code == 429]
        assert limited and int(limited[0].headers["retry-after"]) <= 60 and limited[0].json()["error"]["type"] == "rate_limit_error"
    assert KEY_A not in gateway.log and KEY_B not in gateway.log, "keys are never logged"


@pytest.mark.parametrize(("request_args", "status", "code"), [
    ({"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    ({"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    ({"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    ({"content": b"prompt=hi", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 400, "invalid_content_type"),
    ({"content": b"x" * (10 * 1024 * 1024), "headers": {"content-type": "application/json"}}, 413, "request_too_large"),
    ({"json": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temprature": 0.5}}, 400, "invalid_request"),
    ({"json": {"model": MODEL, "messages": "hi"}}, 400, "invalid_request"),
])
def test_bad_input_gets_the_documented_status_in_openais_shape(stack, request_args, status, code):
    gateway, _, _, _ = stack
    response = httpx.post(gateway.url + "/v1/chat/completions", timeout=60, **request_args)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text


def test_unknown_routes_and_methods_answer_in_openais_shape(stack):
    gateway, _, _, _ = stack
    missing = httpx.get(gateway.url + "/v1/embeddings")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(gateway.url + "/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    health = httpx.get(gateway.url + "/health").json()
    assert health["status"] == "ok" and health["models"] == [MODEL]
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'belle_gateway_requests_total{route="/v1/chat/completions",status="200"}' in metrics and "belle_gateway_open_streams" in metrics



def test_the_gateway_imports_neither_the_worker_nor_the_gpu_stack():
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'peft', 'bitsandbytes', 'worker'):\n"
            "    sys.modules[name] = None\n"
            "from producer.gateway.app import create_app\n"
            "from producer.settings import Settings\n"
            "create_app(Settings(redis_url='redis://127.0.0.1:1/0'))\n"
            "assert not any(m.startswith(('worker.', 'torch.')) for m in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_whole_openai_batch_flow_with_good_and_bad_lines(stack, tmp_path):
    gateway, keyed, client, _ = stack
    api = oa(gateway)
    good = [{"custom_id": f"ok-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 5}} for i in range(6)]
    bad = [{"custom_id": "too-hot", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 9}},
           {"custom_id": "wrong-endpoint", "method": "POST", "url": "/v1/completions", "body": {"model": MODEL, "prompt": "x"}}]
    lines = [good[0], bad[0], *good[1:4], bad[1], *good[4:]]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    uploaded = api.files.create(file=("batch.jsonl", path.read_bytes()), purpose="batch")
    assert uploaded.bytes == path.stat().st_size and uploaded.purpose == "batch"
    assert api.files.content(uploaded.id).text == path.read_text()
    batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"night": "1"})
    assert batch.status in ("in_progress", "completed") and batch.request_counts.total == 8 and batch.metadata == {"night": "1"}
    batch = wait_for(lambda: (b := api.batches.retrieve(batch.id)).status == "completed" and b, 120, "the batch completed")
    assert (batch.request_counts.completed, batch.request_counts.failed) == (6, 2)
    output = [json.loads(line) for line in api.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(line) for line in api.files.content(batch.error_file_id).text.splitlines()]
    assert [o["custom_id"] for o in output] == [g["custom_id"] for g in good], "input order"
    for entry in output:
        assert entry["response"]["status_code"] == 200
        assert entry["response"]["body"]["choices"][0]["message"]["content"] == client.get(entry["response"]["request_id"]).text
    assert [e["custom_id"] for e in errors] == ["too-hot", "wrong-endpoint"]
    assert [e["response"]["status_code"] for e in errors] == [400, 400]
    assert [e["response"]["body"]["error"]["param"] for e in errors] == ["temperature", "url"]
    assert batch.id in [b.id for b in api.batches.list(limit=10).data]
    # Another tenant sees none of it.
    other = oa(keyed, KEY_A)
    for call in (lambda: other.batches.retrieve(batch.id), lambda: other.files.retrieve(uploaded.id), lambda: other.files.content(batch.output_file_id)):
        with pytest.raises(openai.NotFoundError):
            call()


def test_a_batch_cancelled_while_it_runs_ends_cancelled(stack, tmp_path):
    gateway, _, _, _ = stack
    api = oa(gateway)
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                        "body": {"model": MODEL, "prompt": "go on", "max_tokens": 2000, "min_new_tokens": 100}}) + "\n"
                            for i in range(20)))
    batch = api.batches.create(input_file_id=api.files.create(file=path.read_bytes(), purpose="batch").id, endpoint="/v1/completions",
                               completion_window="24h")
    cancelling = api.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_for(lambda: (b := api.batches.retrieve(batch.id)).status == "cancelled" and b, 120, "the batch ended cancelled")
    assert done.request_counts.total == 20 and done.request_counts.completed + done.request_counts.failed == 20


def test_files_that_are_too_big_or_not_text_are_refused(stack, tmp_path):
    gateway, _, _, _ = stack
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        binary = http.post("/v1/files", files={"file": ("x.jsonl", b"\xff\xfe\x00\n")}, data={"purpose": "batch"})
        assert binary.status_code == 400 and binary.json()["error"]["code"] == "invalid_file"
        purpose = http.post("/v1/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "fine-tune"})
        assert purpose.status_code == 400 and purpose.json()["error"]["param"] == "purpose"
        missing = http.post("/v1/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/completions", "completion_window": "24h"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
