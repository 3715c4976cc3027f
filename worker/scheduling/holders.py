"""A count of holders per key (a job may be held twice: two copies of its message in hand)."""

from __future__ import annotations

import collections
from collections.abc import Hashable, Iterator


class Holds:
    """Keys held at least once. Not locked itself: its owner's lock guards it."""

    def __init__(self) -> None:
        self._counts: collections.Counter[Hashable] = collections.Counter()

    def add(self, key: Hashable) -> None:
        self._counts[key] += 1

    def release(self, key: Hashable) -> bool:
        """One holder lets go; True when it was the last."""
        self._counts[key] -= 1
        if self._counts[key] > 0:
            return False
        del self._counts[key]
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._counts

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._counts))
