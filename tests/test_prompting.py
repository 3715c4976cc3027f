"""Fitting prompts to the context window (a pure function; one token per character here)."""

from __future__ import annotations

import pytest

from producer.errors import ErrorCode
from producer.schemas import parse_request
from worker.errors import JobFailure
from worker.model.model_config import ChatTemplate
from worker.model.prompting import fit_prompt, render

TEMPLATE = ChatTemplate()


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def history(turns: int) -> list[dict]:
    out = []
    for i in range(turns):
        out += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    return out + [{"role": "user", "content": "last"}]


def test_the_template_is_the_belle_one():
    request = parse_request({"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗨"}, {"role": "user", "content": "再见"}]})
    assert render(list(request.messages), TEMPLATE) == "Human: 你好\n\nAssistant: 嗨\n\nHuman: 再见\n\nAssistant: "


def test_a_prompt_that_fits_is_kept_whole():
    request = parse_request({"prompt": "hello", "max_new_tokens": 10})
    fitted = fit_prompt(request, lambda messages: chars(render(messages, TEMPLATE)), context_length=100)
    assert "".join(map(chr, fitted.input_ids)) == "Human: hello\n\nAssistant: "
    assert fitted.max_new_tokens == 10 and fitted.fit.messages_dropped == 0 and fitted.fit.max_new_tokens_clamped_to is None


def test_oldest_turns_are_dropped_first_and_the_system_message_stays():
    messages = [{"role": "system", "content": "SYS"}] + history(10)
    request = parse_request({"messages": messages, "max_new_tokens": 20})
    full = len(render(list(request.messages), TEMPLATE))
    fitted = fit_prompt(request, lambda messages: chars(render(messages, TEMPLATE)), context_length=full - 40 + 20)
    text = "".join(map(chr, fitted.input_ids))
    assert text.startswith("SYS\n\n") and text.endswith("Human: last\n\nAssistant: ")
    assert "q0" not in text and "q9" in text
    assert fitted.fit.messages_dropped % 2 == 0 and fitted.fit.messages_dropped > 0
    assert len(fitted.input_ids) + 20 <= full - 20
    # The fewest turns are dropped: keeping one more would not fit.
    kept_one_more = len(fitted.input_ids) + len("Human: q0\n\nAssistant: a0\n\n")
    assert kept_one_more + 20 > full - 20


def test_max_new_tokens_is_clamped_when_only_the_last_turn_is_left():
    request = parse_request({"messages": history(3), "max_new_tokens": 50, "min_new_tokens": 5})
    last = len("Human: last\n\nAssistant: ")
    fitted = fit_prompt(request, lambda messages: chars(render(messages, TEMPLATE)), context_length=last + 30)
    assert fitted.fit.messages_dropped == 6
    assert fitted.max_new_tokens == 30 and fitted.fit.max_new_tokens_clamped_to == 30


def test_no_room_for_min_new_tokens_fails_with_context_length_exceeded():
    request = parse_request({"prompt": "x" * 100, "max_new_tokens": 50, "min_new_tokens": 10})
    with pytest.raises(JobFailure) as info:
        fit_prompt(request, lambda messages: chars(render(messages, TEMPLATE)), context_length=len("Human: \n\nAssistant: ") + 100 + 9)
    assert info.value.error.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert info.value.error.parameter == "prompt"
    assert "shorten the prompt" in info.value.error.message
