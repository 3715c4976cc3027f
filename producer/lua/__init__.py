"""The Lua scripts, one ``.lua`` file each, and their loader: the client's scripts are in this folder,
the worker's in worker/serving/lua/ (whose ``script(name)`` passes its folder to ``script`` here). Every
file starts with a comment saying what it does, its KEYS and its ARGV.

A line ``-- include: NAME`` stands for the fragment ``NAME.lua`` (from the script's own folder, else this one):
Lua functions that several scripts share (``record``, ``events``, ``batch_move``, ``finalize``, ``stats``; the
worker's ``requeue``). A fragment goes into a script once, at its first include, so one that includes another
that its script also includes is fine. The fragment ``constants`` is no file: it gives the scripts what Python
defines (the webhooks stream's key, ``keys.WEBHOOKS``, a job record's key without its id, the fleet metrics'
keys ``keys.JOBS_ENDED`` and ``keys.OPEN_BATCHES``, the final states, ``records.FINAL_STATES``, the parts of a
queue's and a batch's key names, the fairly shared queues' tenants lists, and ``message_for``: a job's message,
as ``producer.enqueue.task_message`` writes it).

``ScriptPipeline`` runs scripts in a pipeline without the ``SCRIPT EXISTS`` redis-py sends before each.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

from producer import keys
from producer.records import FINAL_STATES

FOLDER = Path(__file__).resolve().parent
WEBHOOK_STREAM_MAX = 1_000_000  # the webhooks stream keeps about this many events (delivered ones are acknowledged, not deleted)

_INCLUDE = re.compile(r"^-- include: (\w+)[ \t]*$", re.MULTILINE)


_JOB, _QUEUE = "JOBIDMARK", '"QUEUEMARK"'


def _message_for() -> str:
    """Lua's ``message_for(job_id, queue)``: ``producer.enqueue.task_message(job_id, None, queue)``, the same text."""
    from producer.enqueue import task_message  # (it imports what imports this module)

    parts: list[str] = []
    for i, piece in enumerate(task_message(_JOB, None, "QUEUEMARK").split(_QUEUE)):
        if i:
            parts.append("cjson.encode(queue)")
        for j, text in enumerate(piece.split(_JOB)):
            if j:
                parts.append("job_id")
            parts.append(lua_string(text))
    return f"local function message_for(job_id, queue)\n  return {' .. '.join(parts)}\nend\n"


def lua_string(text: str) -> str:
    """A Lua string literal of ``text``."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def fair_queues() -> frozenset[str]:
    from producer.fairness import FAIR_QUEUES  # (it imports this module)

    return FAIR_QUEUES


def _constants() -> str:
    final = ", ".join(f"['{state}']=true" for state in sorted(s.value for s in FINAL_STATES))
    return (f"-- constants (producer/lua/__init__.py)\n"
            f"local WEBHOOKS = '{keys.WEBHOOKS}'\n"
            f"local WEBHOOK_STREAM_MAX = '{WEBHOOK_STREAM_MAX}'\n"
            f"local JOB_KEY_PREFIX = '{keys.job('')}'\n"
            f"local JOBS_ENDED = '{keys.JOBS_ENDED}'\n"
            f"local OPEN_BATCHES = '{keys.OPEN_BATCHES}'\n"
            f"local FINAL = {{{final}}}\n"
            f"local QUEUE_KEY = {{prefix = {lua_string(keys.queue_waiting(_JOB).split(_JOB)[0])}, waiting = {lua_string(keys.queue_waiting(_JOB).split(_JOB)[1])}, "
            f"taken = {lua_string(keys.queue_taken(_JOB).split(_JOB)[1])}, sequence = {lua_string(keys.queue_sequence(_JOB).split(_JOB)[1])}}}\n"
            f"local BATCH_KEY_PREFIX = {lua_string(keys.batch(''))}\n"
            f"local FAIR_TENANTS = {{{', '.join(f'[{lua_string(q)}] = {lua_string(keys.fair_tenants(q))}' for q in sorted(fair_queues()))}}}\n"
            + _message_for())


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


class ScriptPipeline:
    """A pipeline (no transaction) that runs registered scripts by EVALSHA alone: redis-py sends SCRIPT EXISTS
    before every pipeline holding a ``Script`` call, one more command and round trip each time. A call whose
    script Redis does not know (it restarted, or its scripts were flushed) runs again alone after the others,
    through the ``Script``, which loads it. ``pipe``: the pipeline, for the other commands."""

    def __init__(self, client):
        self.pipe = client.pipeline(transaction=False)
        self._calls: dict[int, tuple[Any, list, list]] = {}  # place in the pipeline → (script, its keys, args)

    def __len__(self) -> int:
        return len(self.pipe)

    def script(self, script, names: list, args: list) -> None:
        self._calls[len(self.pipe)] = (script, names, args)
        self.pipe.evalsha(script.sha, len(names), *names, *args)

    def execute(self) -> list:
        """The replies, in order; raises the first error, as a pipeline does."""
        replies = self.pipe.execute(raise_on_error=False)
        for place, (script, names, args) in self._calls.items():
            if isinstance(replies[place], NoScriptError):
                replies[place] = script(keys=names, args=args)
        self._calls = {}
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies
