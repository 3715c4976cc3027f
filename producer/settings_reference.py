"""The configuration reference (docs/configuration.md), generated from the settings model.

    python -m producer.settings_reference > docs/configuration.md

One Markdown table per group of ``Settings`` fields; the groups are the ``# --- name ---`` comments in
the class body of producer/settings.py, read from its source, so a setting added under one of them lands
in its table with nothing else to edit. Each row: the environment variable, the default, the values it
takes (from the field's type and bounds) and the field's description. Imports only producer.settings
(pydantic-settings): no worker, no torch.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from producer.settings import Settings, is_secret

COMMAND = ".venv/bin/python -m producer.settings_reference > docs/configuration.md"

# Defaults computed when the settings are read, shown as what they mean rather than as this machine's value.
_COMPUTED_DEFAULTS = {
    "configs_dir": "the checkout's `configs/`, else `producer/configs` of the installed package",
}

_GROUP = re.compile(r"^\s*# --- (?P<title>.+?) ---\s*$")
_FIELD = re.compile(r"^\s+(?P<name>[A-Za-z_]\w*)\s*:")

HEADER = f"""\
# Configuration

<!-- Generated from producer/settings.py by producer/settings_reference.py: do not edit by hand.
     After changing a setting, run: {COMMAND} -->

Every setting is read in one place (`producer/settings.py`, pydantic-settings): from the environment,
as `BELLE_` + the setting's name in capitals, or from a YAML file named by `BELLE_SETTINGS_FILE`
(lower-case names, without the prefix); the environment wins over the file, and both over the defaults
below. Nothing else in belle-queue reads the environment.

```yaml
# belle.yaml, used with BELLE_SETTINGS_FILE=belle.yaml
redis_url: redis://:password@redis.internal:6379/0
result_ttl_s: 172800
max_attempts: 5
```

`belle-queue settings` prints every value in effect and where it came from (environment, settings file
or default; `--json`: one object), with secrets masked: the password of a Redis URL (and any query
parameter named like a secret), and any setting named like a secret (`BELLE_API_KEYS`,
`BELLE_WEBHOOK_SECRET`) shows `***`.

Producers (clients, the CLI, the gateway) and workers both enforce the request limits: give them the
same values.
"""


def groups() -> list[tuple[str, list[str]]]:
    """The settings' groups in the order of the class body: (title, field names)."""
    fields = Settings.model_fields
    found: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    title = "General"
    for line in inspect.getsource(Settings).splitlines():
        if match := _GROUP.match(line):
            title = match["title"][:1].upper() + match["title"][1:]
            continue
        match = _FIELD.match(line)
        if match and match["name"] in fields and match["name"] not in seen:
            if not found or found[-1][0] != title:
                found.append((title, []))
            found[-1][1].append(match["name"])
            seen.add(match["name"])
    rest = [name for name in fields if name not in seen]  # (declared elsewhere: inherited, say)
    if rest:
        found.append(("Other", rest))
    return found


def env_name(name: str) -> str:
    return f"{Settings.model_config.get('env_prefix', '')}{name}".upper()


def _value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    if isinstance(value, Path):
        home = str(Path.home())
        text = str(value)
        if text == home or text.startswith(home + "/"):
            text = "~" + text[len(home):]
        return f"`{text}`"
    return f"`{value}`"


def default(name: str, field: FieldInfo) -> str:
    if name in _COMPUTED_DEFAULTS:
        return _COMPUTED_DEFAULTS[name]
    if field.default_factory is not None:
        return "computed when the settings are read"
    if field.default is PydanticUndefined:
        return "required"
    return _value(field.default)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(f"`{choice}`" for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    return {bool: "`true` | `false`", int: "integer", float: "number", str: "text", Path: "path"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def values(field: FieldInfo) -> str:
    """What a setting takes: its type, with its bounds."""
    text = _type_name(field.annotation)
    bounds = []
    for item in field.metadata:
        for attribute, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(item, getattr(annotated_types, attribute.capitalize())):
                bounds.append(f"{sign} {_value(getattr(item, attribute)).strip('`')}")
    return f"{text} {', '.join(bounds)}" if bounds else text


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    """docs/configuration.md."""
    fields = Settings.model_fields
    parts = [HEADER]
    for title, names in groups():
        parts.append(f"\n## {title}\n\n| variable | default | values | meaning |\n|---|---|---|---|\n")
        for name in names:
            field = fields[name]
            meaning = field.description or ""
            if is_secret(name):
                meaning += " A secret: `belle-queue settings` shows it as `***`."
            parts.append(f"| `{env_name(name)}` | {_cell(default(name, field))} | {_cell(values(field))} | {_cell(meaning)} |\n")
    return "".join(parts)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
