"""The one measure of what a batch holds in memory, shared by the scheduling policy (which has no model)
and the model's decoding batch and generate() calls."""

from __future__ import annotations


def tokens_held(rows: int, columns: int, to_come: int) -> int:
    """Tokens a batch holds at its longest: rows × (its columns + the most tokens a row may still add)."""
    return rows * (columns + to_come)
