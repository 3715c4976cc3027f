"""What the client commands share: their exit codes, and reading their arguments (request fields,
JSON files, seconds, files to write)."""

from __future__ import annotations

import argparse
import json
import re

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_TIMEOUT, EXIT_REDIS = 0, 1, 2, 3, 4
EXIT_OUTPUT_CLOSED = 128 + 13  # the reader of stdout went away (`| head`): what a Unix tool killed by SIGPIPE reports


def parse_set(pairs: list[str]) -> dict:
    from producer.errors import InvalidRequestError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequestError.single("--set", shown(pair), f"--set takes key=value (e.g. --set temperature=0.7), got {shown(pair)!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value  # a bare string
        except RecursionError:  # (JSON, but deeper than anything can read)
            raise InvalidRequestError.single(f"--set {shown(key)}", None, f"--set {shown(key)}: the value nests too deeply to read") from None
    return out


def read_json_file(path: str, option: str):
    """The JSON value in the file named by ``option``; InvalidRequestError naming the option and what is wrong."""
    from producer.errors import InvalidRequestError
    from producer.jsontext import parse_json

    def refuse(problem: str):
        return InvalidRequestError.single(option, shown(path), f"{option} {shown(path)!r}: {problem}")

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise refuse(f"cannot read it ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"it is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})") from None
    if not text.strip():
        raise refuse("it is empty; it must hold JSON") from None
    try:
        return parse_json(text)
    except ValueError as exc:
        raise refuse(f"it is not JSON ({exc})") from None


def shown(text: str) -> str:
    """Command-line text as it can be printed (bytes that were not UTF-8 come back as \\x..)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")[:200]


def seconds(text: str) -> float:
    """argparse type of --wait and --timeout: a finite number of seconds, at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {shown(text)!r}") from None
    if not 0 <= value < 10**9:  # (also refuses nan and inf)
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds from 0, got {shown(text)!r}")
    return value


def memory_size(text: str) -> str:
    """argparse type of --maxmemory: bytes, or a number with Redis's units (512mb, 2gb), as Redis reads it."""
    if not re.fullmatch(r"\d+([kmg]b?)?", text.strip().lower()):
        raise argparse.ArgumentTypeError(f"must be a size such as 512mb or 2gb (or bytes), got {shown(text)!r}")
    return text.strip().lower()


def open_output(path: str, option: str):
    """A file to write, opened; InvalidRequestError naming the option when it cannot be."""
    from producer.errors import InvalidRequestError

    try:
        return open(path, "w", encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise InvalidRequestError.single(option, shown(path), f"{option} {shown(path)!r}: cannot write it ({getattr(exc, 'strerror', None) or exc})") from None
