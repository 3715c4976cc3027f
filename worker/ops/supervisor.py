"""`belle-queue worker --gpus 0,1 | all` and `--device cpu --processes N`: one worker process per GPU
(pinned with CUDA_VISIBLE_DEVICES, node name per GPU) or per CPU process, supervised.

- A child that exits while the supervisor runs is restarted at once the first time (its jobs wait for
  a worker meanwhile), then after a back-off that doubles from 1 s up to 60 s, and goes back to "at
  once" once a child has run for a minute. (Its unacknowledged jobs are
  redelivered by Redis after the visibility timeout, to whichever worker takes them.)
- SIGTERM (or SIGINT) is forwarded to every child, which shuts down warm: the jobs being decoded
  finish, the others go back to the queue. A second signal is forwarded too (Celery's cold
  shutdown). The supervisor exits once every child has.

The supervisor imports neither torch nor the model: each child loads its own.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("belle.supervisor")

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 60.0


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff_s: float = 0.0  # before its next restart
    start_at: float = 0.0  # when to (re)start it


def node_name(base: str, suffix: str) -> str:
    """``belle@host`` + ``gpu0`` → ``belle-gpu0@host``."""
    worker, sep, host = base.partition("@")
    return f"{worker}-{suffix}{sep}{host}"


def child_command(args: list[str], name: str) -> list[str]:
    return [sys.executable, "-m", "worker", *args, "--name", name]


class Supervisor:
    def __init__(self, children: list[Child]):
        self.children = children
        self._signals: list[int] = []

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda number, frame: self._signals.append(number))
        log.info("supervising %d workers: %s", len(self.children), ", ".join(c.name for c in self.children))
        forwarded = 0
        while True:
            if len(self._signals) > forwarded:
                for number in self._signals[forwarded:]:
                    log.info("forwarding %s to %d workers", signal.Signals(number).name, sum(c.process is not None for c in self.children))
                    for child in self.children:
                        if child.process is not None and child.process.poll() is None:
                            child.process.send_signal(signal.SIGTERM if number == signal.SIGINT else number)
                forwarded = len(self._signals)
            stopping = bool(self._signals)
            for child in self.children:
                self._tend(child, stopping)
            if stopping and all(c.process is None for c in self.children):
                log.info("every worker has stopped")
                return 0
            time.sleep(0.2)

    def _tend(self, child: Child, stopping: bool) -> None:
        now = time.monotonic()
        if child.process is not None:
            code = child.process.poll()
            if code is None:
                if now - child.started_at >= STABLE_AFTER_S:
                    child.backoff_s = 0.0
                return
            child.process = None
            if stopping:
                log.info("%s exited (code %s)", child.name, code)
                return
            child.start_at = now + child.backoff_s
            log.warning("%s exited (code %s); restarting it %s", child.name, code, f"in {child.backoff_s:.0f} s" if child.backoff_s else "now")
            child.backoff_s = min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, child.backoff_s * 2))
            return
        if not stopping and now >= child.start_at:
            child.process = subprocess.Popen(child.command, env=child.env)
            child.started_at = now
            log.info("started %s (pid %d)", child.name, child.process.pid)


def plan(worker_args: list[str], base_name: str, *, gpus: list[str] | None, processes: int, metrics_port: int | None = None) -> list[Child]:
    """One child per GPU (device cuda, only that GPU visible) or ``processes`` children on the CPU;
    child i serves its metrics on ``metrics_port + i``."""
    slots = [(f"gpu{gpu}", "cuda", {"CUDA_VISIBLE_DEVICES": gpu}) for gpu in gpus] if gpus else [(str(i), "cpu", {}) for i in range(processes)]
    children = []
    for i, (suffix, device, env) in enumerate(slots):
        name = node_name(base_name, suffix)
        if metrics_port:
            env = {**env, "BELLE_METRICS_PORT": str(metrics_port + i)}
        children.append(Child(name, child_command([*worker_args, "--device", device], name), {**os.environ, **env}))
    return children


def visible_gpus(spec: str) -> list[str]:
    """``0,1`` → ["0", "1"]; ``all`` → every GPU torch sees."""
    if spec != "all":
        return [g.strip() for g in spec.split(",") if g.strip()]
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise SystemExit("error: --gpus all, but torch sees no CUDA device (check the driver and the torch build)")
    return [str(i) for i in range(count)]
