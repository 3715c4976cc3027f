"""A short real generation right after the model loads, before the worker announces itself.

A model can load and still fail at its first step: 4-bit weights whose layer sizes bitsandbytes' kernel
does not take (on a CPU with AVX512-BF16 it repacks each 4-bit layer at its first use, which needs
in_features a multiple of the quantisation block size and out_features a multiple of 32), a device too
small for one short sequence. Without the warm-up such a worker announces itself and then fails every
job with the same opaque error; with it, the worker does not start, and says why and what to change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from producer.errors import BelleError
from producer.schemas import parse_request
from worker.model.model_config import ModelConfig

if TYPE_CHECKING:
    from worker.model.engine import Engine

# Greedy, one row, two tokens: a prefill call and a decoding step, each through every layer.
WARM_UP_REQUEST = {"prompt": "Hello", "num_beams": 1, "max_new_tokens": 2, "min_new_tokens": 2}
PACKED_ROWS = 32  # bitsandbytes' repacked 4-bit CPU layout takes a layer's output rows in blocks of this many
LAYERS_NAMED = 3  # in a refusal; the others are counted


class ModelNotServable(BelleError):
    """The model loaded but cannot generate: the worker does not start. The message names the setting to change."""


def warm_up(engine: Engine) -> None:
    """Generate two tokens through the loaded model; raise ModelNotServable if that fails."""
    try:
        engine.generate_batch([engine.prepare("warm-up", parse_request(WARM_UP_REQUEST))])
    except Exception as exc:
        raise ModelNotServable(why_not_servable(engine.config, engine.model, exc)) from exc


def why_not_servable(config: ModelConfig, model: torch.nn.Module, exc: Exception) -> str:
    failed = f"(a 2-token warm-up generation failed: {type(exc).__name__}: {str(exc)[:300]})"
    if isinstance(exc, torch.OutOfMemoryError):
        return (f"model {config.name} loaded but has no memory left to generate {failed}; free memory on the device, or use a smaller "
                "model, or set quantization: 8bit or 4bit in its model config")
    mode = config.quantization.mode
    if mode == "4bit":
        layers = unsuited_4bit_layers(model)
        sizes = ""
        if layers:
            sizes = ": " + "; ".join(layers[:LAYERS_NAMED]) + (f" (and {len(layers) - LAYERS_NAMED} more layers)" if len(layers) > LAYERS_NAMED else "")
        return f"model {config.name} cannot generate with quantization mode 4bit{sizes}; set quantization: 8bit or none in its model config {failed}"
    if mode == "8bit":
        return f"model {config.name} cannot generate with quantization mode 8bit; set quantization: none (or 4bit) in its model config {failed}"
    return f"model {config.name} loaded but cannot generate; check the checkpoint ({config.path}) and its model config {failed}"


def unsuited_4bit_layers(model: torch.nn.Module) -> list[str]:
    """The 4-bit layers whose sizes bitsandbytes' repacked CPU kernel refuses, each with the size at fault."""
    problems = []
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or not hasattr(module, "in_features"):
            continue
        if module.in_features % state.blocksize:
            problems.append(f"layer {name} has in_features {module.in_features}, not a multiple of the 4-bit block size {state.blocksize}")
        elif module.out_features % PACKED_ROWS:
            problems.append(f"layer {name} has out_features {module.out_features}, not a multiple of {PACKED_ROWS}")
    return problems
