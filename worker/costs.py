"""The one measure of what a batch holds in memory, shared by the scheduling policy (which has no model)
and the model's decoding batch and generate() calls; and the one rule that places joining rows in the
decoding batch's lanes (rows that share a KV arena and its columns: worker/model/lanes.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# A lane takes rows whose prompts would leave at least this share of its columns real...
LANE_EFFICIENCY = 0.5
# ...or that keep it this narrow: below this, padding costs less than a model call of a lane of its own.
LANE_MIN_COLUMNS = 256
MAX_LANES = 4


def tokens_held(rows: int, columns: int, to_come: int) -> int:
    """Tokens a batch holds at its longest: rows × (its columns + the most tokens a row may still add)."""
    return rows * (columns + to_come)


@dataclass(frozen=True)
class LaneShape:
    """A lane as placing and costing see it: its rows, its columns, the most tokens a row may still add,
    and the real (not padding) tokens its rows hold."""

    rows: int = 0
    columns: int = 0
    to_come: int = 0
    real: int = 0

    def cost(self) -> int:
        return tokens_held(self.rows, self.columns, self.to_come)

    def with_rows(self, rows: int, columns: int, to_come: int, real: int) -> LaneShape:
        return LaneShape(self.rows + rows, max(self.columns, columns), max(self.to_come, to_come), self.real + real)

    def efficiency(self) -> float:
        return self.real / max(1, self.rows * self.columns)


def lane_for(lanes: Sequence[LaneShape], rows: int, columns: int, to_come: int, real: int) -> int:
    """The lane that ``rows`` rows (the widest ``columns`` long, ``real`` tokens in all) join: the index of
    one of ``lanes``, or ``len(lanes)`` for a new lane. A lane takes them if it stays narrow or mostly
    real; of those, the one left most real. With MAX_LANES lanes, the one left most real takes them."""
    best, best_efficiency = len(lanes), -1.0
    for i, lane in enumerate(lanes):
        after = lane.with_rows(rows, columns, to_come, real)
        efficiency = after.efficiency()
        if (after.columns <= LANE_MIN_COLUMNS or efficiency >= LANE_EFFICIENCY or len(lanes) >= MAX_LANES) and efficiency > best_efficiency:
            best, best_efficiency = i, efficiency
    return best


def place(lanes: Sequence[LaneShape], rows: int, columns: int, to_come: int, real: int) -> tuple[int, list[LaneShape]]:
    """The lane ``lane_for`` gives those rows, and ``lanes`` once they have joined it."""
    at = lane_for(lanes, rows, columns, to_come, real)
    after = list(lanes) if at < len(lanes) else [*lanes, LaneShape()]
    after[at] = after[at].with_rows(rows, columns, to_come, real)
    return at, after


def lanes_cost(lanes: Sequence[LaneShape]) -> int:
    return sum(lane.cost() for lane in lanes)
