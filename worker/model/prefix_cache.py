"""The keys and values of recent long prompts, kept for the next job whose prompt starts the same way
(a conversation's next turn starts with its earlier turns; an overnight batch repeats its instructions).

A prompt is cut into blocks of BLOCK tokens, and each run of whole leading blocks is known by a chain
hash (the adapter, then each block in turn), so the longest cached run a new prompt starts with is found
in one pass over it. A joining row that finds one has those columns copied into its slot and only the
rest of its prompt prefilled (worker/model/lanes.py). Keys carry their positions from the prompt's first
token, wherever the row sits in its lane, so a copied prefix is what prefilling it would write.

Capacity is counted in tokens (BELLE_PREFIX_CACHE_TOKENS); the least recently used prompt goes first.
Prompts shorter than MIN_TOKENS are not kept: prefilling them costs less than finding them. Everything is
dropped when memory runs out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

BLOCK = 64
MIN_TOKENS = 2 * BLOCK


@dataclass(eq=False)
class CachedPrefix:
    tokens: list[int]  # the prompt's first len(tokens) tokens (whole blocks)
    keys: list[torch.Tensor]  # per layer [heads, tokens, head_dim]
    values: list[torch.Tensor]
    hashes: list[int] = field(default_factory=list)  # the chain hashes it is found by


class PrefixCache:
    def __init__(self, capacity_tokens: int):
        self.capacity = capacity_tokens
        self.held = 0  # tokens held
        self._entries: OrderedDict[int, CachedPrefix] = OrderedDict()  # by id, least recently used first
        self._by_hash: dict[int, CachedPrefix] = {}
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _chain(adapter: str | None, tokens: Sequence[int], blocks: int) -> list[int]:
        """The chain hash after each of the first ``blocks`` blocks."""
        h, out = hash(("belle-prefix", adapter)), []
        for k in range(blocks):
            h = hash((h, tuple(tokens[k * BLOCK:(k + 1) * BLOCK])))
            out.append(h)
        return out

    def lookup(self, adapter: str | None, tokens: Sequence[int]) -> tuple[CachedPrefix, int] | None:
        """The longest cached run of whole blocks ``tokens`` starts with (leaving it at least one token
        of its own), and its length in tokens."""
        found = self.find(adapter, tokens)
        if found is not None:
            self._entries.move_to_end(id(found[0]))
            self.hits += 1
            self.reused_tokens += found[1]
        return found

    def find(self, adapter: str | None, tokens: Sequence[int]) -> tuple[CachedPrefix, int] | None:
        blocks = (len(tokens) - 1) // BLOCK
        if self.capacity <= 0 or blocks * BLOCK < MIN_TOKENS or not self._entries:
            return None
        chain = self._chain(adapter, tokens, blocks)
        for k in range(blocks, MIN_TOKENS // BLOCK - 1, -1):
            entry = self._by_hash.get(chain[k - 1])
            if entry is not None and entry.tokens[: k * BLOCK] == list(tokens[: k * BLOCK]):
                return entry, k * BLOCK
        return None

    def store(self, adapter: str | None, tokens: Sequence[int], read: Callable[[int], tuple[list[torch.Tensor], list[torch.Tensor]]]) -> None:
        """Keep the whole blocks of ``tokens`` (leaving its last token out); ``read(n)`` gives the keys
        and values of its first n tokens. Nothing is kept when a cached prompt already covers them."""
        n = (len(tokens) - 1) // BLOCK * BLOCK
        if self.capacity <= 0 or n < MIN_TOKENS or n > self.capacity:
            return
        known = self.find(adapter, tokens[: n + 1])
        if known is not None and known[1] >= n:
            return
        while self.held + n > self.capacity:
            self._evict(next(iter(self._entries.values())))
        try:
            keys, values = read(n)
        except torch.OutOfMemoryError:
            self.clear()
            return
        entry = CachedPrefix(list(tokens[:n]), keys, values, self._chain(adapter, tokens, n // BLOCK)[MIN_TOKENS // BLOCK - 1:])
        self._entries[id(entry)] = entry
        for h in entry.hashes:
            self._by_hash[h] = entry
        self.held += n

    def _evict(self, entry: CachedPrefix) -> None:
        del self._entries[id(entry)]
        for h in entry.hashes:
            if self._by_hash.get(h) is entry:
                del self._by_hash[h]
        self.held -= len(entry.tokens)

    def clear(self) -> None:
        self._entries.clear()
        self._by_hash.clear()
        self.held = 0
