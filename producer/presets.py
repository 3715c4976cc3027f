"""Named parameter sets (seed §3.2, §3.3, §4, §7) from configs/presets.yaml."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from producer.settings import Settings, get_settings


def load_presets(settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    return _load((settings or get_settings()).presets_file)


@functools.cache
def _load(path: Path) -> dict[str, dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    return {name: dict(entry["parameters"]) for name, entry in data.items()}


def describe_presets(settings: Settings | None = None) -> dict[str, str]:
    with open((settings or get_settings()).presets_file, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    return {name: entry.get("description", "") for name, entry in data.items()}
