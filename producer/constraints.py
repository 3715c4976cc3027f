"""Structured output: what a request may constrain its text to, checked at submit time.

Three ways, at most one per request:
- ``response_format``: OpenAI's shape, ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``
  (any JSON object) or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}``;
- ``guided_regex``: the text matches this regular expression, whole;
- ``guided_choice``: the text is one of these strings.

A JSON Schema may use only the keywords the worker's grammar engine (xgrammar) enforces: a keyword it
would silently ignore would let through text that does not validate, so such a schema is refused,
naming the keyword and where it is. ``Constraint`` is the canonical form the worker compiles (and
caches by ``Constraint.key``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

# Keywords that constrain what is generated and are enforced.
ENFORCED_KEYWORDS = frozenset({
    "type", "enum", "const", "anyOf", "$ref", "$defs", "definitions",
    "properties", "required", "additionalProperties", "patternProperties", "propertyNames", "minProperties", "maxProperties",
    "items", "prefixItems", "minItems", "maxItems",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "format",
})
# Keywords that only describe: accepted, and they change nothing.
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly"})
# What to do instead of a keyword that is refused, where there is something.
INSTEAD = {
    "oneOf": "use anyOf (an output may match more than one branch, which oneOf forbids)",
    "allOf": "merge the subschemas into one",
    "nullable": 'use "type": ["…", "null"]',
    "multipleOf": "use minimum and maximum, or enum",
}
# Escapes Python's regexes know and the grammar's do not (it would read them as letters or ignore them).
UNSUPPORTED_ESCAPES = {"A": "\\A", "Z": "\\Z", "z": "\\z", "b": "\\b (a word boundary)", "B": "\\B", "G": "\\G"}
FORMATS = frozenset({"date", "time", "date-time", "email", "uuid", "ipv4", "ipv6", "hostname", "uri"})
TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_DEPTH = 32
MAX_CHOICES = 256


class ConstraintProblem(ValueError):
    """A constraint that cannot be used; the message names what and the fix."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class Constraint:
    """What a job's text is constrained to: ``kind`` json_schema (``source``: the schema as canonical
    JSON), json_object, regex (the pattern) or choice (the choices as a JSON list)."""

    kind: str
    source: str = ""

    @property
    def parameter(self) -> str:
        """The request field it comes from."""
        return {"regex": "guided_regex", "choice": "guided_choice"}.get(self.kind, "response_format")

    @property
    def key(self) -> str:
        """A hash that names the compiled grammar (the worker's cache key)."""
        return hashlib.sha256(f"{self.kind}\0{self.source}".encode()).hexdigest()[:32]


def check_response_format(value: Any, max_bytes: int) -> dict[str, Any]:
    """The response_format as stored (unchanged when valid); raises ConstraintProblem."""
    if not isinstance(value, dict):
        raise ConstraintProblem("response_format", f"response_format must be an object with a type, got {type(value).__name__}")
    kind = value.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise ConstraintProblem("response_format.type", f"response_format.type must be one of 'text', 'json_object', 'json_schema', got {kind!r}")
    if extra := sorted(set(value) - allowed[kind]):
        raise ConstraintProblem(f"response_format.{extra[0]}", f"response_format of type {kind!r} takes no field {extra[0]!r}")
    if kind != "json_schema":
        return value
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ConstraintProblem("response_format.json_schema", "response_format.json_schema must be an object with name and schema")
    if extra := sorted(set(spec) - {"name", "schema", "strict", "description"}):
        raise ConstraintProblem(f"response_format.json_schema.{extra[0]}",
                                f"response_format.json_schema takes name, schema, strict and description, got {extra[0]!r}")
    name = spec.get("name")
    if not isinstance(name, str) or not SCHEMA_NAME.match(name):
        raise ConstraintProblem("response_format.json_schema.name", f"response_format.json_schema.name must be 1–64 of A–Z, a–z, 0–9, _ and -, got {name!r}")
    if "strict" in spec and spec["strict"] is not None and not isinstance(spec["strict"], bool):
        raise ConstraintProblem("response_format.json_schema.strict", f"response_format.json_schema.strict must be true or false, got {spec['strict']!r}")
    if "description" in spec and not isinstance(spec["description"], str):
        raise ConstraintProblem("response_format.json_schema.description", "response_format.json_schema.description must be a string")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ConstraintProblem("response_format.json_schema.schema", f"response_format.json_schema.schema must be a JSON Schema object, got {type(schema).__name__}")
    size = len(json.dumps(schema, ensure_ascii=False).encode("utf-8"))
    if size > max_bytes:
        raise ConstraintProblem("response_format.json_schema.schema",
                                f"response_format.json_schema.schema must be at most {max_bytes} bytes as JSON, got {size}; simplify it or raise BELLE_MAX_CONSTRAINT_BYTES")
    check_schema(schema)
    return value


def check_schema(schema: Any, where: str = "schema", depth: int = 0) -> None:
    """Refuse what the grammar engine would not enforce, naming the keyword and its place."""
    parameter = "response_format.json_schema.schema"
    if depth > MAX_DEPTH:
        raise ConstraintProblem(parameter, f"{parameter} must nest at most {MAX_DEPTH} schemas deep; flatten it or use $defs")
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ConstraintProblem(parameter, f"{parameter}: {where} must be a schema (an object or a boolean), got {type(schema).__name__}")
    if ("pattern" in schema or "format" in schema) and ("minLength" in schema or "maxLength" in schema):
        raise ConstraintProblem(parameter, f"{parameter}: {where} has a pattern or format and minLength/maxLength, which structured output "
                                           "cannot enforce together; put the length into the pattern (e.g. {2,10})")
    for keyword, value in schema.items():
        if keyword in ANNOTATIONS:
            continue
        if keyword not in ENFORCED_KEYWORDS:
            instead = INSTEAD.get(keyword, "drop it, or check the output yourself")
            raise ConstraintProblem(parameter, f"{parameter}: {where} uses {keyword!r}, which structured output does not enforce; {instead}")
        if keyword == "type":
            types = value if isinstance(value, list) else [value]
            if not types or any(t not in TYPES for t in types):
                raise ConstraintProblem(parameter, f"{parameter}: {where}.type must be one of {sorted(TYPES)} or a list of them, got {value!r}")
        elif keyword == "format" and value not in FORMATS:
            raise ConstraintProblem(parameter, f"{parameter}: {where}.format must be one of {sorted(FORMATS)}, got {value!r}; use pattern instead")
        elif keyword == "pattern":
            check_regex(value, f"{parameter} ({where}.pattern)")
        elif keyword == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            raise ConstraintProblem(parameter, f"{parameter}: {where}.$ref must point inside the schema (#/$defs/…), got {value!r}")
        elif keyword in ("properties", "patternProperties", "$defs", "definitions"):
            if not isinstance(value, dict):
                raise ConstraintProblem(parameter, f"{parameter}: {where}.{keyword} must be an object of schemas")
            for name, child in value.items():
                check_schema(child, f"{where}.{keyword}.{name}", depth + 1)
        elif keyword in ("items", "additionalProperties", "contains", "propertyNames"):
            check_schema(value, f"{where}.{keyword}", depth + 1)
        elif keyword in ("prefixItems", "anyOf"):
            if not isinstance(value, list) or not value:
                raise ConstraintProblem(parameter, f"{parameter}: {where}.{keyword} must be a non-empty list of schemas")
            for i, child in enumerate(value):
                check_schema(child, f"{where}.{keyword}[{i}]", depth + 1)
        elif keyword == "required" and not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
            raise ConstraintProblem(parameter, f"{parameter}: {where}.required must be a list of property names")
        elif keyword == "enum" and not (isinstance(value, list) and value):
            raise ConstraintProblem(parameter, f"{parameter}: {where}.enum must be a non-empty list")


def check_regex(value: Any, parameter: str = "guided_regex", max_bytes: int | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise ConstraintProblem(parameter, f"{parameter} must be a non-empty regular expression, got {value!r}")
    if max_bytes is not None and len(value.encode("utf-8")) > max_bytes:
        raise ConstraintProblem(parameter, f"{parameter} must be at most {max_bytes} bytes, got {len(value.encode('utf-8'))}; raise BELLE_MAX_CONSTRAINT_BYTES")
    try:
        re.compile(value)
    except re.error as exc:
        raise ConstraintProblem(parameter, f"{parameter} does not compile: {exc}; fix the expression") from None
    if problem := _unsupported_regex(value):
        raise ConstraintProblem(parameter, f"{parameter} uses {problem}, which structured output's regexes do not support; rewrite it without")
    return value


def _unsupported_regex(pattern: str) -> str | None:
    """What in a (Python-valid) regex the grammar's regexes would not honour; None if nothing."""
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            e = pattern[i + 1]
            if not in_class and (e in UNSUPPORTED_ESCAPES or (e.isdigit() and e != "0")):
                return UNSUPPORTED_ESCAPES.get(e, f"a back-reference (\\{e})")
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if pattern[i + 1:i + 2] == "]" or pattern[i + 1:i + 3] == "^]":
                i += 2 if pattern[i + 1] == "]" else 3  # a ']' first in a class is a character
                continue
        elif c == "(" and pattern[i + 1:i + 2] == "?" and pattern[i + 2:i + 3] != ":":
            return "(?…) group syntax (lookaround, named groups or flags)"
        elif c == "^" and i != 0:
            return "^ other than at its start"
        elif c == "$" and i != len(pattern) - 1:
            return "$ other than at its end"
        i += 1
    return None


def check_choices(value: Any, max_bytes: int) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise ConstraintProblem("guided_choice", f"guided_choice must be a non-empty list of non-empty strings, got {value!r}"[:300])
    if len(value) > MAX_CHOICES:
        raise ConstraintProblem("guided_choice", f"guided_choice must hold at most {MAX_CHOICES} strings, got {len(value)}")
    size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    if size > max_bytes:
        raise ConstraintProblem("guided_choice", f"guided_choice must be at most {max_bytes} bytes as JSON, got {size}; raise BELLE_MAX_CONSTRAINT_BYTES")
    return value


def constraint_of(response_format: dict[str, Any] | None, guided_regex: str | None, guided_choice: list[str] | None) -> Constraint | None:
    if guided_regex is not None:
        return Constraint("regex", guided_regex)
    if guided_choice is not None:
        return Constraint("choice", json.dumps(guided_choice, ensure_ascii=False))
    if response_format is None or response_format["type"] == "text":
        return None
    if response_format["type"] == "json_object":
        return Constraint("json_object")
    # Keys keep their order (it is the order properties are generated in), so equal schemas written in
    # another key order are compiled once more.
    return Constraint("json_schema", json.dumps(response_format["json_schema"]["schema"], ensure_ascii=False))
