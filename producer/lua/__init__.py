"""The Lua scripts, one ``.lua`` file each, and their loader: the client's scripts are in this folder,
the worker's in worker/serving/lua/ (whose ``script(name)`` passes its folder to ``script`` here). Every
file starts with a comment saying what it does, its KEYS and its ARGV.

A line ``-- include: NAME`` stands for the fragment ``NAME.lua`` (from the script's own folder, else this one):
Lua functions that several scripts share (``events``, ``batch_move``, ``finalize``, ``stats``; the worker's ``requeue``).
A fragment goes into a script once, at its first include, so one that includes another that its script also
includes is fine. The fragment ``constants`` is no file: it gives the scripts what Python defines (the
webhooks stream's key, ``keys.WEBHOOKS``, a job record's key without its id, the fleet metrics' keys
``keys.JOBS_ENDED`` and ``keys.OPEN_BATCHES``, and the final states, ``records.FINAL_STATES``).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from producer import keys
from producer.records import FINAL_STATES

FOLDER = Path(__file__).resolve().parent
WEBHOOK_STREAM_MAX = 1_000_000  # the webhooks stream keeps about this many events (delivered ones are acknowledged, not deleted)

_INCLUDE = re.compile(r"^-- include: (\w+)[ \t]*$", re.MULTILINE)


def _constants() -> str:
    final = ", ".join(f"['{state}']=true" for state in sorted(s.value for s in FINAL_STATES))
    return (f"-- constants (producer/lua/__init__.py)\n"
            f"local WEBHOOKS = '{keys.WEBHOOKS}'\n"
            f"local WEBHOOK_STREAM_MAX = '{WEBHOOK_STREAM_MAX}'\n"
            f"local JOB_KEY_PREFIX = '{keys.job('')}'\n"
            f"local JOBS_ENDED = '{keys.JOBS_ENDED}'\n"
            f"local OPEN_BATCHES = '{keys.OPEN_BATCHES}'\n"
            f"local FINAL = {{{final}}}\n")


@functools.cache
def script(name: str, folder: Path = FOLDER) -> str:
    """The source of ``folder/NAME.lua`` with its includes in place."""
    included: set[str] = set()

    def fragment(match: re.Match) -> str:
        part = match.group(1)
        if part in included:
            return f"-- ({part}: included above)"
        included.add(part)
        if part == "constants":
            return _constants()
        path = folder / f"{part}.lua"
        return expand(path if path.is_file() else FOLDER / f"{part}.lua")

    def expand(path: Path) -> str:
        return _INCLUDE.sub(fragment, path.read_text(encoding="utf-8"))

    return expand(folder / f"{name}.lua")
