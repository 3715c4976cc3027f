"""One model call for every lane of a decoding step (lanes.py), on models whose attention layers take
transformers' attention interface (``_supports_attention_backend``: LLaMA, Qwen, Mistral and the like).

A call per lane reads every weight once per lane: on a CPU, a second call for two long rows cost
about a third of the call for 62 short ones. Here the layers' linear parts run once over all rows,
and only attention is split: each lane's rows attend over their own arena's columns with their own
mask, keys and values shared across query heads where the model groups them (no copies per head). For
the step, the model's attention implementation is switched to ``NAME`` (which builds no mask of its own:
transformers skips mask creation for an implementation it has no mask function for), and back after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer

if TYPE_CHECKING:
    from worker.model.lanes import Lane

NAME = "belle_lanes"


class LanesStep:
    """The lanes of one step, rows ``[start, end)`` of the call each; each lane's mask already holds
    the column the step writes."""

    def __init__(self, lanes: Sequence[Lane]):
        self.parts: list[tuple[Lane, int, int, torch.Tensor]] = []
        at = 0
        for lane in lanes:
            n = len(lane)
            self.parts.append((lane, at, at + n, lane.mask[:, : lane.length + 1].bool()[:, None, None, :]))
            at += n

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for lane, start, end, _ in self.parts:
            keys, values = lane.arena.keys[layer], lane.arena.values[layer]
            keys[: end - start, :, lane.length] = key_states[start:end, :, 0]
            values[: end - start, :, lane.length] = value_states[start:end, :, 0]

    def attend(self, layer: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """[rows, heads, 1, head_dim] queries → [rows, 1, heads, head_dim] outputs."""
        outputs = []
        for lane, start, end, mask in self.parts:
            columns = lane.length + 1
            keys = lane.arena.keys[layer][: end - start, :, :columns]
            values = lane.arena.values[layer][: end - start, :, :columns]
            outputs.append(F.scaled_dot_product_attention(query[start:end], keys, values, attn_mask=mask, scale=scaling,
                                                          enable_gqa=query.shape[1] != keys.shape[1]))
        return torch.cat(outputs).transpose(1, 2).contiguous()


class _StepLayer(DynamicLayer):
    def __init__(self, step: LanesStep, index: int):
        super().__init__()
        self.step, self.index = step, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self.step.write(self.index, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return max(lane.length for lane, *_ in self.step.parts)


class StepCache(Cache):
    """The cache the model writes one step's keys and values through, into each lane's arena."""

    def __init__(self, step: LanesStep, layers: int):
        super().__init__(layers=[_StepLayer(step, i) for i in range(layers)])


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, lanes: LanesStep | None = None, **kwargs):
    if lanes is None:
        raise RuntimeError("the lanes attention ran without its lanes (only DecodeBatch.forward switches to it)")
    return lanes.attend(module.layer_idx, query, scaling), None


AttentionInterface.register(NAME, _attention)


def supported(model) -> bool:
    """Whether one call can serve every lane: the model takes the attention interface, runs sdpa, and
    every layer attends over all its columns plainly (no sliding window, no soft-capped or sink
    attention, which this function does not apply)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if not getattr(base, "_supports_attention_backend", False) or config._attn_implementation != "sdpa":
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return not any(getattr(config, name, None) for name in ("attn_logit_softcapping", "attention_sink", "sinks"))


@contextlib.contextmanager
def lanes_attention(model) -> Iterator[None]:
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
