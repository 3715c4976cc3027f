"""Model configs (configs/models/*.yaml): where the checkpoint is, how to load it, how to prompt it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from producer.settings import Settings


class ChatTemplate(BaseModel):
    """How messages become prompt text. Each part has one ``{content}`` placeholder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str = "{content}\n\n"
    user: str = "Human: {content}\n\nAssistant: "
    assistant: str = "{content}\n\n"


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Name reported in results.")
    path: str = Field(description="Checkpoint folder or hub id; '{cache_dir}' expands to BELLE_CACHE_DIR, relative paths to the YAML's folder.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    context_length: int = Field(2048, ge=16, description="Prompt plus generated tokens must fit in this many tokens.")
    template: ChatTemplate = ChatTemplate()


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
    raw = config.path.replace("{cache_dir}", str(settings.cache_dir))
    local = Path(raw).expanduser()
    if not local.is_absolute() and (path.parent / local).exists():
        local = (path.parent / local).resolve()
    resolved = str(local) if local.is_absolute() or local.exists() else raw  # else a hub id
    return config.model_copy(update={"path": resolved})
