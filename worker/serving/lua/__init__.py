"""The worker's Lua scripts, one ``.lua`` file each in this folder: the job record's transitions only a worker
makes (worker/serving/job_writes.py) and its other Redis writes (resend, reclaim, output events, put back,
heartbeat while full). Loaded as the client's are (producer/lua/: the header of each file, its includes)."""

from __future__ import annotations

from pathlib import Path

from producer import lua

FOLDER = Path(__file__).resolve().parent


def script(name: str) -> str:
    """The source of NAME.lua in this folder, its includes in place (from here, else producer/lua/)."""
    return lua.script(name, FOLDER)
