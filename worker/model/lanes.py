"""A lane of the decoding batch: rows that share one KV arena (kv_cache.py) and its columns.

Rows are left-padded so that every row of a lane writes its next token in the same column, and the
lane's attention mask hides each row's padding. A lane is as wide as its longest row, so rows of very
different lengths go to different lanes (worker/costs.py ``lane_for``): a long prompt makes only its
own lane long, and a short row costs what its own lane costs. The decoding batch (decoding.py) runs
each lane's rows in one model call per step.

Slot i of the arena and row i of ``mask`` belong to ``rows[i]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from worker.costs import LaneShape
from worker.model.kv_cache import KVArena
from worker.model.prefix_cache import PrefixCache

if TYPE_CHECKING:
    from worker.model.decoding import Row

TRIM_AT = 64  # columns of padding shared by every row at which the arena drops them
SHARED_PREFIX_MIN = 16  # prompt tokens that the rows of a prefill call all start with, worth computing once


def shared_prefix(inputs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of ``inputs`` share, leaving each at least one token of its own
    (its last position gives its first logits)."""
    first, most = inputs[0], min(len(x) for x in inputs) - 1
    n = 0
    while n < most and all(x[n] == first[n] for x in inputs):
        n += 1
    return n


class Lane:
    def __init__(self, engine, arena: KVArena | None = None, prefixes: PrefixCache | None = None):
        self.engine = engine
        self.prefixes = prefixes
        self.arena = arena if arena is not None else KVArena(engine.num_layers)
        self.rows: list[Row] = []
        self.length = 0  # columns in use; a row's next token goes in this column
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=engine.device)  # [rows, column capacity]
        self.filling: list[Row] = []  # a job's rows whose prompt is being prefilled in chunks (``fill``)
        self.filled = 0  # of their prompt, the tokens prefilled so far

    def __len__(self) -> int:
        return len(self.rows)

    def shape(self) -> LaneShape:
        """Its rows, or the rows it is filling, as they will be once filled."""
        rows = self.rows or self.filling
        length = self.length if self.rows else max((r.held for r in rows), default=0)
        return LaneShape(len(rows), length, max((r.remaining for r in rows), default=0), sum(r.held for r in rows))

    # --- membership ---

    def join(self, groups: Sequence[Sequence[Row]]) -> tuple[list[Row], torch.Tensor]:
        """Prefill each group in one call, into free slots; returns the rows in the order they were
        placed and their first logits. If this raises, no row has joined (the running rows may have
        moved right, which changes nothing they compute)."""
        groups = self._cached_apart(groups)
        n = len(self.rows)
        length = max([self.length] + [len(r.inputs) for g in groups for r in g])
        joining = [r for g in groups for r in g]
        columns = length + max(r.remaining for r in [*self.rows, *joining])
        self._reserve(n + len(joining), columns, shift=length - self.length if n else 0)
        self.length = length
        try:
            masks, logits, placed = [], [], []
            at = n
            for group in groups:
                group_rows, group_mask, group_logits = self._prefill(group, at)
                placed += group_rows
                masks.append(group_mask)
                logits.append(group_logits)
                at += len(group_rows)
        except BaseException:
            if n == 0:
                self.length = 0
            raise
        self.mask = torch.cat([self.mask[:n], *masks])
        self.rows += placed
        return placed, torch.cat(logits)

    def _cached_apart(self, groups: Sequence[Sequence[Row]]) -> list[Sequence[Row]]:
        """The groups, with each job whose prompt starts with a cached prefix in a group of its own (it
        prefills only the rest of its prompt)."""
        if self.prefixes is None or not len(self.prefixes):
            return list(groups)
        out: list[Sequence[Row]] = []
        for group in groups:
            apart: dict[int, list[Row]] = {}
            for row in group:
                if id(row.active) in apart or self.prefixes.find(row.active.job.request.adapter, row.inputs) is not None:
                    apart.setdefault(id(row.active), []).append(row)
            rest = [r for r in group if id(r.active) not in apart]
            out += [*apart.values(), *([rest] if rest else [])]
        return out

    def _prefill(self, group: Sequence[Row], at: int) -> tuple[list[Row], torch.Tensor, torch.Tensor]:
        """Prefill ``group`` into slots ``at``…, right-aligned at the current column. Rows of one job
        that starts fresh share one input: it is computed once and its row copied. Returns the rows
        in the order they were placed, their mask rows and logits."""
        firsts, copies, source = [], [], {}
        for row in group:
            key = (id(row.active), -1 if not row.tokens else id(row))
            if key in source:
                copies.append((row, source[key]))
            else:
                source[key] = len(firsts)
                firsts.append(row)
        width = max(len(r.inputs) for r in firsts)
        start = self.length - width
        adapters = [r.active.job.request.adapter for r in firsts]
        # A prefix every row starts with (a chat template's system message) is computed once, in the first
        # row, and its keys and values copied to the others; the rest of each row follows it, right-aligned
        # (keys carry their positions, so the gap of padding between the two parts is only masked out).
        cached = self.prefixes.lookup(adapters[0], firsts[0].inputs) if self.prefixes is not None and len(firsts) == 1 else None
        prefix = shared_prefix([r.inputs for r in firsts]) if len(firsts) > 1 and len(set(adapters)) == 1 else 0
        if cached is not None:
            entry, prefix = cached
            self.arena.write_prefix(at, start, entry.keys, entry.values, prefix)
        elif prefix < SHARED_PREFIX_MIN:
            prefix = 0
        else:
            ids = torch.tensor([firsts[0].inputs[:prefix]], dtype=torch.long, device=self.engine.device)
            self.engine.forward(ids, torch.ones_like(ids), self.arena.view(slice(at, at + 1), start, start), adapters[:1])
            self.arena.copy_columns(at, slice(at + 1, at + len(firsts)), start, start + prefix)
        rest = width - prefix
        input_ids = torch.full((len(firsts), rest), self.engine.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(firsts), width), dtype=torch.long)
        attention[:, :prefix] = 1
        for i, row in enumerate(firsts):
            own = row.inputs[prefix:]
            input_ids[i, rest - len(own):] = torch.tensor(own, dtype=torch.long)
            attention[i, width - len(own):] = 1
        input_ids, attention = input_ids.to(self.engine.device), attention.to(self.engine.device)
        logits = self.engine.forward(input_ids, attention, self.arena.view(slice(at, at + len(firsts)), start, start + prefix), adapters)
        self.arena.zero(slice(at, at + len(firsts)), start)
        if self.prefixes is not None:
            for i, row in enumerate(firsts):
                if cached is not None or prefix == 0 or len(row.inputs) == width:  # its columns are one run
                    begins = self.length - len(row.inputs)
                    self.prefixes.store(adapters[i], row.inputs, lambda n, slot=at + i, begins=begins: self.arena.read_prefix(slot, begins, n))
        for k, (_, first) in enumerate(copies):
            self.arena.move_row(at + first, at + len(firsts) + k, self.length)
        picked = list(range(len(firsts))) + [first for _, first in copies]
        mask = torch.zeros((len(picked), self.mask.shape[1]), dtype=torch.long, device=attention.device)
        mask[:, start:self.length] = attention[picked]
        return firsts + [row for row, _ in copies], mask, logits[picked]

    # --- a prompt prefilled in chunks ---

    def begin_fill(self, rows: list[Row]) -> None:
        """Prefill the prompt these rows share (one job's fresh rows) in chunks, one ``fill`` call at a time,
        into this lane of their own; nothing is allocated yet."""
        self.filling, self.filled = list(rows), 0

    def fill(self, chunk: int) -> torch.Tensor | None:
        """Prefill the next ``chunk`` tokens of the prompt; once it is all in, the rows become this lane's
        rows and their first logits are returned. A call that fails leaves the lane as it was."""
        first = self.filling[0]
        inputs, adapter = first.inputs, first.active.job.request.adapter
        if self.filled == 0:
            self._reserve(len(self.filling), len(inputs) + max(r.remaining for r in self.filling))
        if self.filled == 0 and self.prefixes is not None and (cached := self.prefixes.lookup(adapter, inputs)) is not None:
            entry, self.filled = cached
            self.arena.write_prefix(0, 0, entry.keys, entry.values, self.filled)
        end = min(len(inputs), self.filled + chunk)
        ids = torch.tensor([inputs[self.filled:end]], dtype=torch.long, device=self.engine.device)
        attention = torch.ones((1, end), dtype=torch.long, device=self.engine.device)
        logits = self.engine.forward(ids, attention, self.arena.view(slice(0, 1), 0, self.filled), [adapter])
        self.filled = end
        if end < len(inputs):
            return None
        mask = torch.zeros((len(self.filling), self.arena.column_capacity), dtype=torch.long, device=self.mask.device)
        mask[:, :end] = 1
        for k in range(1, len(self.filling)):
            self.arena.move_row(0, k, end)
        self.rows, self.length, self.mask, self.filling = self.filling, end, mask, []
        if self.prefixes is not None:
            self.prefixes.store(adapter, inputs, lambda n: self.arena.read_prefix(0, 0, n))
        return logits[[0] * len(self.rows)]

    def unfill(self) -> None:
        """Back to filling its rows, from the start (their joining the batch failed)."""
        self.filling, self.rows, self.length, self.filled = self.rows, [], 0, 0
        self.mask = self.mask[:0]

    def remove(self, gone: set[int]) -> None:
        """Take out the rows whose ids are in ``gone``: each freed slot takes the last row."""
        order = list(range(len(self.rows)))  # order[slot] = the old slot now there
        for slot in sorted((i for i, r in enumerate(self.rows) if id(r) in gone), reverse=True):
            last = len(order) - 1
            if slot != last:
                self.arena.move_row(order[last], slot, self.length)
                order[slot] = order[last]
            order.pop()
        self.rows = [self.rows[i] for i in order]
        self.mask = self.mask[torch.tensor(order, dtype=torch.long, device=self.mask.device)]
        self._trim()

    def _trim(self) -> None:
        """Drop the leading columns that are padding in every row, once there are TRIM_AT of them."""
        if not self.rows:
            self.length = 0
            return
        shared = int((self.mask[:, : self.length].cumsum(-1) == 0).sum(-1).min())
        if shared >= TRIM_AT:
            self._reserve(len(self.rows), self.arena.column_capacity, shift=-shared)
            self.length -= shared

    def _reserve(self, rows: int, columns: int, *, shift: int = 0) -> None:
        n = len(self.rows)
        self.arena.reserve(rows, columns, live=n, length=self.length, shift=shift)
        capacity = self.arena.column_capacity
        if shift or self.mask.shape[1] != capacity:
            mask = torch.zeros((n, capacity), dtype=torch.long, device=self.mask.device)
            if shift >= 0:
                mask[:, shift:shift + self.length] = self.mask[:n, : self.length]
            else:
                mask[:, : self.length + shift] = self.mask[:n, -shift:self.length]
            self.mask = mask

    def read_rows(self, targets: list[int], sources: list[int]) -> tuple[int, list[torch.Tensor], torch.Tensor]:
        """What ``write_rows`` gives slots ``targets``: the cache and mask of slots ``sources`` (beams
        that continue another beam), from the first column either uses."""
        taken = torch.tensor(sources, dtype=torch.long, device=self.mask.device)
        both = torch.cat([taken, torch.tensor(targets, dtype=torch.long, device=self.mask.device)])
        start = int((self.mask[both, : self.length].cumsum(-1) == 0).sum(-1).min()) if self.length else 0
        return start, self.arena.read_rows(taken, start, self.length), self.mask[taken]

    def write_rows(self, targets: list[int], read: tuple[int, list[torch.Tensor], torch.Tensor]) -> None:
        start, parts, mask = read
        into = torch.tensor(targets, dtype=torch.long, device=self.mask.device)
        self.arena.write_rows(into, parts, start, self.length)
        self.mask[into] = mask

    # --- a step ---

    def forward(self, tokens: torch.Tensor, adapters: Sequence[str | None]) -> torch.Tensor:
        """The model on each row's last token (``tokens``: [rows, 1]), written in column ``length`` (opened
        first by ``open_column``); the rows' next logits. Then ``advance`` makes the column theirs, or
        ``undo`` forgets it (a call failed)."""
        return self.engine.forward(tokens, self.mask[:, : self.length + 1], self.arena.view(slice(0, len(self.rows)), 0, self.length), adapters)

    def open_column(self) -> None:
        """Make column ``length`` the rows' next one (room for it, and unmasked)."""
        if self.length >= self.arena.column_capacity:
            self._reserve(len(self.rows), self.length + 1)
        self.mask[:, self.length] = 1

    def positions(self) -> torch.Tensor:
        """Each row's position of its next token: the real tokens before it."""
        return self.mask[:, : self.length].sum(-1)

    def advance(self) -> None:
        self.length += 1

    def undo(self) -> None:
        self.mask[:, self.length] = 0

    def release(self) -> None:
        self.arena.release()
        self.mask = self.mask[:, :0]
