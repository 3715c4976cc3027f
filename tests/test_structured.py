"""Structured output: the contract refuses what the grammar engine would not enforce, and the decoding
batch keeps each constrained row to its grammar, beside rows with other grammars and with none.

In-process on the real tiny models (a random-weight model follows its grammar as well as a trained one:
the mask leaves it nothing else); SmolLM2's answers are validated in tests/test_real_model.py.
"""

from __future__ import annotations

import json
import re

import pytest

from producer.errors import ErrorCode, InvalidRequestError
from producer.records import FinishReason
from producer.schemas import parse_request
from producer.settings import Settings
from tests.test_batcher import assert_same_output, load, prepare
from worker.errors import JobFailure
from worker.scheduling.batcher import Batcher

CHOICE = {"guided_choice": ["yes", "no", "maybe later"]}
REGEX = {"guided_regex": r"[A-Z]{2}-\d{3}"}
ENUM_SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["red", "green", "blue"]}, "sure": {"type": "boolean"}},
               "required": ["answer", "sure"], "additionalProperties": False}


def json_schema(schema: dict, name: str = "answer") -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}}


def refusal(data: dict) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        parse_request({"prompt": "hi", "num_beams": 1, **data})
    return info.value


# --- the contract ---


@pytest.mark.parametrize(("schema", "keyword", "hint"), [
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}}, "oneOf", "use anyOf"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "allOf", "merge the subschemas"),
    ({"type": "string", "not": {"const": "x"}}, "not", "drop it"),
    ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if", "drop it"),
    ({"type": "object", "properties": {"a": {"type": "integer", "nullable": True}}}, "nullable", '"type": ["…", "null"]'),
    ({"type": "array", "items": {"type": "string", "x-custom": 1}}, "x-custom", "drop it"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems", "drop it"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf", "use minimum and maximum"),
])
def test_a_schema_keyword_the_grammar_would_not_enforce_is_refused_by_name_and_place(schema, keyword, hint):
    error = refusal(json_schema(schema))
    assert error.problems[0].parameter == "response_format.json_schema.schema"
    assert f"uses {keyword!r}, which structured output does not enforce" in str(error) and hint in str(error)


def test_what_structured_output_takes_and_refuses_at_submit_time():
    nested = {"type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 3}},
              "$defs": {"item": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}, "required": ["n"]}},
              "required": ["items"], "title": "annotations are fine"}
    assert parse_request({"prompt": "hi", **json_schema(nested)}).constraint.kind == "json_schema"
    assert parse_request({"prompt": "hi", "response_format": {"type": "json_object"}}).constraint.kind == "json_object"
    assert parse_request({"prompt": "hi", "response_format": {"type": "text"}}).constraint is None
    assert parse_request({"prompt": "hi", **CHOICE}).constraint.kind == "choice"
    assert parse_request({"prompt": "hi", "num_beams": 4, **REGEX}).constraint.kind == "regex", "beam search is constrained too"
    # The same constraint, the same cache key; another, another.
    assert parse_request({"prompt": "a", **REGEX}).constraint.key == parse_request({"prompt": "b", **REGEX}).constraint.key
    assert parse_request({"prompt": "a", **REGEX}).constraint.key != parse_request({"prompt": "a", "guided_regex": "x"}).constraint.key

    assert "guided_regex does not compile" in str(refusal({"guided_regex": "(unclosed"}))
    # What Python's regexes take and the grammar's would not honour (it would read \Z as a letter, say).
    for regex, what in ((r"a(?=b)b", "(?…) group syntax"), (r"end\Z", "\\Z"), (r"\bword", "word boundary"), (r"(a)\1", "back-reference"),
                        (r"a^b", "^ other than at its start")):
        assert what in str(refusal({"guided_regex": regex})), regex
    assert parse_request({"prompt": "hi", "guided_regex": r"^[^a-z]+(?:-\d{2})?$"}).guided_regex
    assert "minLength/maxLength" in str(refusal(json_schema({"type": "string", "pattern": "^a+$", "maxLength": 3})))
    assert refusal({"guided_choice": []}).problems[0].parameter == "guided_choice"
    assert "give at most one of" in str(refusal({**REGEX, **CHOICE}))
    assert "not beam sampling" in str(refusal({**CHOICE, "do_sample": True, "num_beams": 2}))
    assert refusal({"response_format": {"type": "xml"}}).problems[0].parameter == "response_format.type"
    assert refusal({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}}).problems[0].parameter == \
        "response_format.json_schema.name"
    assert "format must be one of" in str(refusal(json_schema({"type": "string", "format": "credit-card"})))
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(400)}}
    assert "BELLE_MAX_CONSTRAINT_BYTES" in str(refusal(json_schema(big)))


def test_an_openai_batch_line_carries_its_response_format_into_the_job():
    from producer.openai_compat import openai_job_fields, openai_request

    line = {"method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "Pick."}], "temperature": 0, **json_schema(ENUM_SCHEMA)}}
    request = parse_request(openai_job_fields(openai_request(line), presets={}))
    assert request.constraint.kind == "json_schema" and request.response_format["json_schema"]["schema"] == ENUM_SCHEMA
    assert request.num_beams == 1 and not request.do_sample
    bad = {**line, "body": {**line["body"], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"if": {}}}}}}
    with pytest.raises(InvalidRequestError, match="uses 'if', which structured output does not enforce"):
        parse_request(openai_job_fields(openai_request(bad), presets={}))


def test_a_regex_the_grammar_engine_cannot_compile_fails_the_job_with_invalid_request(tiny_bloom):
    engine = load(tiny_bloom)
    with pytest.raises(JobFailure) as info:
        prepare(engine, "possessive", prompt="hi", num_beams=1, guided_regex=r"a*+b")  # Python compiles it; the grammar cannot
    assert info.value.error.code is ErrorCode.INVALID_REQUEST and info.value.error.parameter == "guided_regex"
    assert "could not be compiled into a grammar" in info.value.error.message


# --- in the decoding batch ---


def test_constrained_and_free_rows_share_a_batch_and_each_gives_what_it_gives_alone(tiny_bloom):
    engine = load(tiny_bloom)
    requests = {
        "choice": {"prompt": "Is it?", **CHOICE},
        "regex": {"prompt": "A code:", **REGEX},
        "schema": {"prompt": "Pick a colour.", **json_schema(ENUM_SCHEMA)},
        "object": {"prompt": "An object:", "response_format": {"type": "json_object"}, "max_new_tokens": 24},
        "free": {"prompt": "What is machine learning?", "max_new_tokens": 16},
        "sampled": {"prompt": "Pick a colour.", **json_schema(ENUM_SCHEMA), "do_sample": True, "seed": 4, "num_return_sequences": 2},
        "beams": {"prompt": "Pick a colour.", **json_schema(ENUM_SCHEMA), "num_beams": 3, "num_return_sequences": 2},
    }
    jobs = [prepare(engine, job_id, **{"num_beams": 1, "max_new_tokens": 32, **r}) for job_id, r in requests.items()]
    batcher = Batcher(engine, Settings(batch_wait_ms=50, batch_max_delay_ms=500, batch_yield_s=0)).start()
    try:
        alone = {job.job_id: batcher.run(job).result for job in jobs}
        futures = [batcher.submit(job) for job in jobs]
        together = {g.job_id: g.result for g in (f.result(timeout=120) for f in futures)}
    finally:
        batcher.stop()
    for job in jobs:
        if job.request.do_sample:  # seeded: the same draws whatever decodes beside it
            assert [s.token_ids for s in together[job.job_id].sequences] == [s.token_ids for s in alone[job.job_id].sequences], job.job_id
        else:
            assert_same_output(together[job.job_id].sequences, alone[job.job_id].sequences, job.job_id)
    assert max(r.timings.batch_size for r in together.values()) == len(jobs)
    assert together["choice"].sequences[0].text in CHOICE["guided_choice"]
    assert re.fullmatch(REGEX["guided_regex"], together["regex"].sequences[0].text)
    for job_id in ("schema", "sampled", "beams"):
        for sequence in together[job_id].sequences:
            value = json.loads(sequence.text)
            assert set(value) == {"answer", "sure"} and value["answer"] in ("red", "green", "blue") and isinstance(value["sure"], bool), job_id
            assert sequence.finish_reason is FinishReason.EOS
    assert isinstance(json.loads(together["object"].sequences[0].text), dict) or together["object"].sequences[0].finish_reason is FinishReason.LENGTH
    free = together["free"].sequences[0].text
    assert free and not free.startswith("{"), "the unconstrained row is not held to anyone's grammar"


def test_output_cut_by_max_new_tokens_says_length_and_is_not_passed_off_as_json(tiny_bloom):
    engine = load(tiny_bloom)
    schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 200}}, "required": ["story"]}
    batcher = Batcher(engine, Settings()).start()
    try:
        (sequence,) = batcher.run(prepare(engine, "cut", prompt="Tell a story.", num_beams=1, max_new_tokens=6, **json_schema(schema))).result.sequences
    finally:
        batcher.stop()
    assert sequence.finish_reason is FinishReason.LENGTH and '{"story": "'.startswith(sequence.text[:11]) and sequence.text.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(sequence.text)
