"""Waiting on a real condition with a deadline (never a bare sleep): tests pass on a busy machine."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_S = 0.05


def wait_for(condition: Callable[[], T], timeout: float, what: str | Callable[[], str], *, poll: float = POLL_S) -> T:
    """Poll ``condition`` until it returns something true, and return that; AssertionError naming
    ``what`` (a text, or a function making one) after ``timeout`` seconds. A short ``poll`` for a state
    that may not last long (a batch that decodes for a few milliseconds)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:g} s: {what() if callable(what) else what}")
        time.sleep(poll)
    return value


def stays(condition: Callable[[], object], seconds: float, what: str | Callable[[], str]) -> None:
    """Assert that ``condition`` holds at every poll for ``seconds`` (for what must not happen, such as a
    redelivery, which only time can show). ``what`` may be a function, called on failure only."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        assert condition(), what() if callable(what) else what
        time.sleep(POLL_S)
