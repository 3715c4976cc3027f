"""The request contract: every rule at its boundaries, with the message it gives."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.errors import InvalidRequestError
from producer.presets import load_presets
from producer.schemas import ADAPTER_NAME, GenerationRequest, parse_request
from producer.settings import Settings

# (parameter, low, high, step outside the range, extra fields that make the boundary values legal)
RANGES = [
    ("num_beams", 1, 10, 1, {}),
    ("num_return_sequences", 1, 10, 1, {"do_sample": True, "num_beams": 1}),
    ("max_new_tokens", 1, 2048, 1, {"min_new_tokens": 1}),
    ("min_new_tokens", 1, 100, 1, {"max_new_tokens": 2048}),
    ("temperature", 0.1, 2.0, 0.01, {}),
    ("top_p", 0.01, 1.0, 0.01, {}),
    ("top_k", 0, 100, 1, {}),
    ("repetition_penalty", 1.0, 2.0, 0.01, {}),
    ("no_repeat_ngram_size", 0, 10, 1, {}),
]


def refusal(data: dict, **kwargs) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(data, **kwargs)
    return info.value


@pytest.mark.parametrize(("name", "lo", "hi", "step", "extra"), RANGES)
def test_range_boundaries_are_inclusive_and_named_when_crossed(name, lo, hi, step, extra):
    for value in (lo, hi):
        assert getattr(parse_request({"prompt": "hi", **extra, name: value}), name) == value
    for value in (round(lo - step, 4), round(hi + step, 4)):
        error = refusal({"prompt": "hi", **extra, name: value})
        assert error.parameter == name
        assert error.value == value
        assert str(error) == f"{name} must be in [{lo}, {hi}], got {value}"


def test_defaults_follow_the_seed_table():
    r = parse_request({"prompt": "hi"})
    assert (r.do_sample, r.num_beams, r.num_return_sequences, r.max_new_tokens, r.min_new_tokens) == (False, 4, 1, 128, 1)
    assert (r.temperature, r.top_p, r.top_k, r.repetition_penalty, r.no_repeat_ngram_size, r.output_scores) == (0.1, 0.75, 40, 1.2, 0, False)


def test_unknown_field_is_refused_with_a_suggestion():
    error = refusal({"prompt": "hi", "temprature": 0.5})
    assert error.parameter == "temprature"
    assert "unknown parameter 'temprature'; did you mean 'temperature'?" in str(error)


def test_wrong_types_are_refused_not_coerced():
    assert str(refusal({"prompt": "hi", "max_new_tokens": "12"})) == "max_new_tokens must be an integer, got str '12'"
    assert refusal({"prompt": "hi", "do_sample": 1}).parameter == "do_sample"
    assert refusal({"prompt": "hi", "num_beams": 2.5}).parameter == "num_beams"
    assert refusal({"prompt": 5}).parameter == "prompt"


def test_nan_is_out_of_range():
    error = refusal({"prompt": "hi", "temperature": float("nan")})
    assert error.parameter == "temperature" and "must be in [0.1, 2.0]" in str(error)


def test_num_return_sequences_with_beams_is_at_most_num_beams():
    assert parse_request({"prompt": "hi", "num_beams": 3, "num_return_sequences": 3}).num_return_sequences == 3
    error = refusal({"prompt": "hi", "num_beams": 3, "num_return_sequences": 4})
    assert error.parameter == "num_return_sequences"
    assert str(error) == "num_return_sequences must be in [1, 3] with num_beams=3, got 4; raise num_beams or lower num_return_sequences"


def test_greedy_returns_exactly_one_sequence():
    error = refusal({"prompt": "hi", "num_beams": 1, "num_return_sequences": 2})
    assert error.parameter == "num_return_sequences" and "must be 1 for greedy decoding" in str(error)
    assert parse_request({"prompt": "hi", "num_beams": 1, "do_sample": True, "num_return_sequences": 10}).num_return_sequences == 10


def test_min_new_tokens_is_at_most_max_new_tokens():
    assert parse_request({"prompt": "hi", "min_new_tokens": 20, "max_new_tokens": 20}).min_new_tokens == 20
    error = refusal({"prompt": "hi", "min_new_tokens": 21, "max_new_tokens": 20})
    assert error.parameter == "min_new_tokens"
    assert str(error) == "min_new_tokens must be in [1, 20] (at most max_new_tokens), got 21"


def test_stream_needs_a_single_beam_and_says_why():
    error = refusal({"prompt": "hi", "stream": True, "num_beams": 2})
    assert error.parameter == "stream"
    assert "stream requires num_beams=1" in str(error) and "beam search knows its best sequence only at the end" in str(error)
    assert parse_request({"prompt": "hi", "stream": True, "num_beams": 1}).stream


def test_a_streamed_request_that_sets_no_num_beams_gets_one_beam_and_one_that_sets_some_keeps_them():
    assert parse_request({"prompt": "hi"}).num_beams == 4
    streamed = parse_request({"prompt": "hi", "stream": True})
    assert (streamed.num_beams, streamed.stream) == (1, True)
    assert parse_request(streamed.to_wire(), resolved=True).num_beams == 1, "the worker gets it as sent"
    presets = {"live": {"stream": True, "max_new_tokens": 50}, "wide": {"num_beams": 3}}
    assert parse_request({"prompt": "hi", "preset": "live"}, presets=presets).num_beams == 1
    for data in ({"prompt": "hi", "stream": True, "num_beams": 3}, {"prompt": "hi", "stream": True, "preset": "wide"}):
        error = refusal(data, presets=presets)  # beams the request or its preset set are kept, and refused with stream
        assert error.parameter == "stream" and "got num_beams=3" in str(error)


@pytest.mark.parametrize(("data", "parameter", "fragment"), [
    ({}, "prompt", "exactly one of prompt or messages is required, got neither"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt", "got both"),
    ({"prompt": ""}, "prompt", "prompt must not be empty"),
    ({"prompt": " \n\t"}, "prompt", "prompt must not be empty"),
    ({"prompt": "a\ud800b"}, "prompt", "valid Unicode text, got an unpaired surrogate at position 1"),
    ({"messages": []}, "messages", "at least one message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages", "must end with a user message"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": "q", "name": "x"}]}, "messages[0].name", "unknown field 'name' in messages[0]; it takes role, content"),
    ({"messages": [{"role": "user", "content": "q", "contnet": "q"}]}, "messages[0].contnet", "unknown field 'contnet' in messages[0]; did you mean 'content'?"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}, "messages", "'system' only for the first"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages", "messages[0].content must not be empty"),
    ({"prompt": "a", "adapter": "../../etc/passwd"}, "adapter", "adapter must match"),
    ({"prompt": "a", "preset": "nope"}, "preset", "preset must be one of ["),
    ({"prompt": "a", "stop": [""]}, "stop", "stop[0] must not be empty"),
    ({"prompt": "a", "seed": -1}, "seed", "seed must be in [0, 9223372036854775807], got -1"),
])
def test_refusals_name_the_parameter(data, parameter, fragment):
    error = refusal(data)
    assert error.parameter == parameter
    assert fragment in str(error)


def test_size_limits_come_from_settings():
    limits = Settings(max_prompt_chars=10, max_messages=2, max_stop_strings=1, max_metadata_bytes=20)
    assert parse_request({"prompt": "x" * 10}, settings=limits).prompt == "x" * 10
    assert "prompt must be at most 10 characters, got 11" in str(refusal({"prompt": "x" * 11}, settings=limits))
    messages = [{"role": "user", "content": "q"}] * 3
    assert "at most 2 messages, got 3" in str(refusal({"messages": messages}, settings=limits))
    assert "at most 1 strings, got 2" in str(refusal({"prompt": "a", "stop": ["x", "y"]}, settings=limits))
    assert "metadata must be at most 20 bytes" in str(refusal({"prompt": "a", "metadata": {"k": "v" * 30}}, settings=limits))


def test_a_huge_value_is_not_echoed_whole():
    error = refusal({"prompt": "x" * 100_000})
    assert len(str(error)) < 300 and len(str(error.value)) < 200


def test_a_single_stop_string_becomes_a_list():
    assert parse_request({"prompt": "a", "stop": "\n\n"}).stop == ["\n\n"]


def test_every_problem_is_listed():
    error = refusal({"prompt": "hi", "temperature": 9, "top_k": -1})
    assert {p.parameter for p in error.problems} == {"temperature", "top_k"}


def test_presets_cover_the_seed_and_explicit_fields_win():
    presets = load_presets()
    assert {"greedy", "beam_search", "sampling", "precise_qa", "chat", "brainstorm", "no_repetition", "basic_qa", "streaming", "creative_writing", "technical_qa"} <= set(presets)
    for name in presets:  # every preset is itself a valid request
        parse_request({"prompt": "hi", "preset": name})
    r = parse_request({"prompt": "hi", "preset": "creative_writing", "temperature": 0.5})
    assert (r.do_sample, r.temperature, r.top_k, r.max_new_tokens, r.repetition_penalty) == (True, 0.5, 80, 800, 1.1)


def test_the_wire_form_revalidates_to_the_same_request():
    r = parse_request({"prompt": "hi", "preset": "beam_search", "stop": "\n", "metadata": {"user": 7}})
    wire = json.loads(json.dumps(r.to_wire()))
    assert parse_request(wire, resolved=True) == r
    # resolved=True does not re-apply the preset: explicit values in the wire form stand.
    changed = {**wire, "num_return_sequences": 1}
    assert parse_request(changed, resolved=True).num_return_sequences == 1


_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 3000), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]), "content": st.text(max_size=10)}), max_size=3),
)
_keys = st.sampled_from(list(GenerationRequest.model_fields) + ["temprature", "", "max_tokens"])
_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]), "content": st.text(max_size=10)}), max_size=3)
# Values around each parameter's rules (in range, just outside, the wrong kind), so that many dicts pass;
# a field without an entry here gets the arbitrary values above.
_near_values = {
    "prompt": st.text(max_size=20), "messages": _messages, "preset": st.sampled_from([*load_presets(), "nope"]),
    "do_sample": st.booleans(), "num_beams": st.integers(0, 11), "num_return_sequences": st.integers(0, 11),
    "max_new_tokens": st.integers(0, 2049), "min_new_tokens": st.integers(0, 101), "temperature": st.floats(0.05, 2.05),
    "top_p": st.floats(0.0, 1.05), "top_k": st.integers(-1, 101), "repetition_penalty": st.floats(0.95, 2.05),
    "no_repeat_ngram_size": st.integers(-1, 11), "output_scores": st.booleans(), "stream": st.booleans(),
    "seed": st.one_of(st.none(), st.integers(-1, 2**63)), "stop": st.one_of(st.text(max_size=6), st.lists(st.text(max_size=6), max_size=5)),
    "adapter": st.one_of(st.none(), st.from_regex(ADAPTER_NAME, fullmatch=True), st.text(max_size=6)),
    "metadata": st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
    "deadline": st.sampled_from([None, 0, 1.0, 4e9]), "webhook": st.sampled_from([None, "https://example.com/hook", "ftp://example.com/x", "not a url"]),
    "webhook_events_filter": st.lists(st.sampled_from(["start", "output", "completed", "end"]), max_size=3),
    "idempotency_key": st.one_of(st.none(), st.text(max_size=130)),
}
_near_requests = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20)},
                                       optional={name: _near_values.get(name, _values) for name in GenerationRequest.model_fields if name != "prompt"})


def test_any_parameter_dict_gives_a_request_keeping_its_values_or_refusals_naming_their_parameter():
    presets = load_presets()
    seen = {"accepted": 0, "refused": 0}

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.one_of(st.dictionaries(_keys, _values, max_size=8), _near_requests))
    def fuzz(data):
        preset = presets.get(data["preset"], {}) if isinstance(data.get("preset"), str) else {}
        try:
            request = parse_request(data)
        except InvalidRequestError as error:  # (any other exception fails the test)
            seen["refused"] += 1
            for problem in error.problems:
                # Each problem names a parameter the request (or its preset) set, or the missing prompt;
                # an unknown key "" is reported against the request as a whole.
                named = problem.parameter.split(".")[0].split("[")[0]
                assert named in {*data, *preset, "prompt"} or (named == "request" and "" in data), (data, problem)
                assert problem.parameter in problem.message or named == "request", (data, problem)
        else:
            seen["accepted"] += 1
            wire = request.to_wire()
            for name, value in {**preset, **data}.items():  # every value given is kept as given (a lone stop string as a list)
                assert wire[name] == ([value] if name == "stop" and isinstance(value, str) else value), (name, value, wire[name])
            assert parse_request(json.loads(json.dumps(wire)), resolved=True) == request, "the wire form round-trips"
            assert (request.prompt is None) != (request.messages is None)
            assert request.min_new_tokens <= request.max_new_tokens
            assert not request.stream or request.num_beams == 1
            assert request.num_return_sequences <= (request.num_beams if request.num_beams > 1 else 10 if request.do_sample else 1)

    fuzz()
    assert seen["accepted"] >= 10 and seen["refused"] >= 10, f"the fuzzing reached both outcomes: {seen}"


@given(st.one_of(st.none(), st.integers(), st.text(), st.lists(st.integers())))
def test_a_non_object_request_is_refused(data):
    assert refusal(data).parameter == "request"
