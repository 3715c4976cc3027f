"""The KV cache of the continuous decoding batch: one arena of preallocated buffers whose rows are
the batch's live rows, kept for the life of the worker.

transformers' ``DynamicCache`` grows by ``torch.cat`` at every step, copying the whole cache each
time; rebuilding a cache whenever a job joins or leaves costs the same again (and first touches of
fresh memory cost more than the copy). Here, per layer, keys and values live in buffers
``[row capacity, heads, column capacity, head_dim]``:
- live rows are slots ``[0, n)``; all share the current column ``length`` (rows are left-padded,
  and the batch's attention mask hides each row's padding);
- a decoding step writes column ``length`` of every live row;
- a joining job is prefilled straight into free slots, right-aligned so its prompt ends at the
  current column;
- a finished row's slot takes the last live row (one row copied);
- a beam search job's rows take the rows of the beams they continue (``read_rows`` then ``write_rows``, its rows only);
- buffers are reallocated only to grow, or to move all rows right (a prompt longer than the
  current column) or left (columns that became padding in every row).

``view(rows, start, length)`` is the transformers ``Cache`` the model reads and writes for one call.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

ROW_GRAIN = 8
COLUMN_GRAIN = 64


class KVArena:
    def __init__(self, layers: int):
        self.layers = layers
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.row_capacity = 0
        self.column_capacity = 0

    @property
    def allocated(self) -> bool:
        return bool(self.keys)

    def reserve(self, rows: int, columns: int, *, live: int, length: int, shift: int = 0) -> None:
        """Make room for ``rows`` slots of ``columns`` columns, keeping the ``live`` rows' first
        ``length`` columns, moved ``shift`` columns right (negative: left, dropping those columns).

        Within the capacity, rows move in place (nothing is allocated); otherwise every new buffer
        is built before any replaces the old ones, so running out of memory here changes nothing."""
        if rows <= self.row_capacity and columns <= self.column_capacity and length + max(shift, 0) <= self.column_capacity:
            if shift:
                for t in self.keys + self.values:
                    _shift_in_place(t, live, length, shift)
            return
        row_capacity = max(self.row_capacity, _round_up(rows, ROW_GRAIN))
        column_capacity = max(self.column_capacity, _round_up(max(columns, length + shift), COLUMN_GRAIN))
        if self.allocated:
            keys = [_moved(t, row_capacity, column_capacity, live, length, shift) for t in self.keys]
            values = [_moved(t, row_capacity, column_capacity, live, length, shift) for t in self.values]
            self.keys, self.values = keys, values
        self.row_capacity, self.column_capacity = row_capacity, column_capacity

    def release(self) -> None:
        """Give the buffers back (after running out of memory, or when asked to)."""
        self.keys, self.values = [], []
        self.row_capacity = self.column_capacity = 0

    def move_row(self, source: int, target: int, length: int) -> None:
        for t in self.keys + self.values:
            t[target, :, :length] = t[source, :, :length]

    def copy_columns(self, source: int, rows: slice, start: int, end: int) -> None:
        """Columns ``[start, end)`` of slot ``source`` into the slots ``rows`` (a prefix computed once)."""
        for t in self.keys + self.values:
            t[rows, :, start:end] = t[source, :, start:end]

    def read_rows(self, rows: torch.Tensor, start: int, end: int) -> list[torch.Tensor]:
        """Columns ``[start, end)`` of slots ``rows``, copied (for ``write_rows``: beams that continue
        another beam read every source before any target is written, so running out of memory while
        reading changes nothing)."""
        return [t[rows, :, start:end] for t in self.keys + self.values]

    def write_rows(self, rows: torch.Tensor, parts: list[torch.Tensor], start: int, end: int) -> None:
        for t, part in zip(self.keys + self.values, parts, strict=True):
            t[rows, :, start:end] = part

    def read_prefix(self, slot: int, start: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A copy of columns ``[start, start + n)`` of one slot: keys and values per layer (prefix_cache.py)."""
        return [t[slot, :, start:start + n].clone() for t in self.keys], [t[slot, :, start:start + n].clone() for t in self.values]

    def write_prefix(self, slot: int, start: int, keys: list[torch.Tensor], values: list[torch.Tensor], n: int) -> None:
        """Columns ``[start, start + n)`` of one slot take the first n tokens of a cached prefix."""
        for layer in range(self.layers):
            self._buffers(layer, keys[layer][None], values[layer][None])
        for t, part in zip(self.keys + self.values, keys + values, strict=True):
            t[slot, :, start:start + n] = part[:, :n]

    def zero(self, rows: slice, columns: int) -> None:
        """Zero the first ``columns`` columns of these rows: padding that attention reads (masked,
        so multiplied by 0, which would not hide a NaN left in recycled memory)."""
        if columns > 0 and self.allocated:
            for t in self.keys + self.values:
                t[rows, :, :columns] = 0

    def view(self, rows: slice, start: int, length: int) -> ArenaCache:
        """The cache of one model call over slots ``rows``, whose columns ``[start, length)`` are
        filled and which writes on from column ``length``."""
        return ArenaCache(self, rows, start, length)

    def _buffers(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.keys) <= layer:  # allocated on first use, when heads and sizes are known
            _, heads, _, dim = key_states.shape
            self.keys.append(key_states.new_empty(self.row_capacity, heads, self.column_capacity, dim))
            self.values.append(value_states.new_empty(self.row_capacity, heads, self.column_capacity, value_states.shape[-1]))
        return self.keys[layer], self.values[layer]


class ArenaLayer(DynamicLayer):
    def __init__(self, arena: KVArena, index: int, rows: slice, start: int, length: int):
        super().__init__()
        self.arena, self.index, self.rows, self.start, self.length = arena, index, rows, start, length
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.arena._buffers(self.index, key_states, value_states)
        end = self.length + key_states.shape[-2]
        keys[self.rows, :, self.length:end] = key_states
        values[self.rows, :, self.length:end] = value_states
        self.length = end
        self.keys = keys[self.rows, :, self.start:end]
        self.values = values[self.rows, :, self.start:end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length - self.start

    def get_max_length(self) -> int:
        return -1


class ArenaCache(Cache):
    """What the model sees of the arena for one call: a transformers ``Cache`` whose layers write
    into the arena's buffers."""

    def __init__(self, arena: KVArena, rows: slice, start: int, length: int):
        super().__init__(layers=[ArenaLayer(arena, i, rows, start, length) for i in range(arena.layers)])


def _round_up(value: int, grain: int) -> int:
    return -(-value // grain) * grain


def _shift_in_place(t: torch.Tensor, live: int, length: int, shift: int) -> None:
    """Move the live rows' first ``length`` columns ``shift`` columns over, in the same buffer, in
    blocks that never overlap their source (so nothing is allocated); shifting right zeroes the
    columns freed on the left."""
    if shift > 0:
        end = length
        while end > 0:
            start = max(0, end - shift)
            t[:live, :, start + shift:end + shift] = t[:live, :, start:end]
            end = start
        t[:live, :, :shift] = 0
    elif shift < 0:
        step, start = -shift, 0
        while start < length + shift:
            stop = min(length + shift, start + step)
            t[:live, :, start:stop] = t[:live, :, start + step:stop + step]
            start = stop


def _moved(old: torch.Tensor, rows: int, columns: int, live: int, length: int, shift: int) -> torch.Tensor:
    new = old.new_empty(rows, old.shape[1], columns, old.shape[3])
    if shift >= 0:
        new[:live, :, :shift] = 0
        new[:live, :, shift:shift + length] = old[:live, :, :length]
    else:
        new[:live, :, : length + shift] = old[:live, :, -shift:length]
    return new
