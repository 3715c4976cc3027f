"""Turning a request into prompt tokens that fit the model's context window.

The rule (documented in docs/requests.md): the prompt and max_new_tokens must fit in context_length.
1. Multi-turn ``messages`` lose their oldest turns (a user message with the reply that follows it)
   until they fit; a leading system message and the last user turn are always kept.
2. If the kept prompt still leaves fewer than max_new_tokens, max_new_tokens is clamped to what is
   left, provided that is at least min_new_tokens; the result's ``prompt_fit`` says so.
3. Otherwise the job fails with ``context_length_exceeded``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from producer.errors import ErrorCode
from producer.records import PromptFit
from producer.schemas import GenerationRequest, Message
from worker.errors import JobFailure
from worker.model.model_config import ChatTemplate

Encode = Callable[[list[Message]], list[int]]  # messages → prompt tokens (the model's template applied)


@dataclass(frozen=True)
class FittedPrompt:
    input_ids: list[int]
    max_new_tokens: int
    fit: PromptFit


def render(messages: list[Message], template: ChatTemplate) -> str:
    parts = {"system": template.system, "user": template.user, "assistant": template.assistant}
    return "".join(parts[m.role].replace("{content}", m.content) for m in messages)


def split_turns(messages: list[Message]) -> tuple[list[Message], list[list[Message]]]:
    """(leading system messages, turns): a turn starts at a user message and holds what follows it."""
    head = [m for m in messages[:1] if m.role == "system"]
    turns: list[list[Message]] = []
    for message in messages[len(head):]:
        if message.role == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return head, turns


def fit_prompt(request: GenerationRequest, encode: Encode, context_length: int) -> FittedPrompt:
    messages = request.messages if request.messages is not None else [Message(role="user", content=request.prompt or "")]
    head, turns = split_turns(list(messages))
    wanted = request.max_new_tokens

    def ids_without(dropped: int) -> list[int]:
        kept = head + [m for turn in turns[dropped:] for m in turn]
        return encode(kept)

    # Fewest dropped turns that fit (more dropped never makes the prompt longer): binary search.
    lo, hi = 0, len(turns) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(ids_without(mid)) + wanted <= context_length:
            hi = mid
        else:
            lo = mid + 1
    dropped = lo
    input_ids = ids_without(dropped)
    messages_dropped = sum(len(turn) for turn in turns[:dropped])
    room = context_length - len(input_ids)
    if room >= wanted:
        return FittedPrompt(input_ids, wanted, PromptFit(context_length=context_length, messages_dropped=messages_dropped))
    if room >= request.min_new_tokens:
        return FittedPrompt(input_ids, room, PromptFit(context_length=context_length, messages_dropped=messages_dropped, max_new_tokens_clamped_to=room))
    raise JobFailure(
        ErrorCode.CONTEXT_LENGTH_EXCEEDED,
        f"the prompt is {len(input_ids)} tokens after dropping all earlier turns; with min_new_tokens={request.min_new_tokens} "
        f"it needs {len(input_ids) + request.min_new_tokens} but the model's context window is {context_length} tokens; "
        "shorten the prompt (or the last message) or lower min_new_tokens",
        parameter="messages" if request.messages is not None else "prompt",
    )
