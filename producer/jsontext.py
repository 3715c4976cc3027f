"""JSON text from outside (a command line, a file, a batch line, an HTTP body), read safely."""

from __future__ import annotations

import json
from typing import Any


def parse_json(text: str | bytes) -> Any:
    """``json.loads``, with every way the text can be unreadable raised as ValueError (JSON that nests
    deeper than Python's recursion limit raises RecursionError in the stdlib)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("it nests too deeply to read") from None
