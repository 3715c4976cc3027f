"""The wheel a backend service installs (`pip install belle-queue`, no extras): built from this tree,
installed with the client's dependencies only into a fresh venv, it carries its configs (presets, model
configs, hardware profiles) and runs the client commands against a real Redis without torch."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from producer import keys
from producer.client import JobClient
from producer.records import JobState
from producer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "producer" / "configs"
# What building the wheel reads; copied, so that the build leaves nothing (build/, egg-info) in the checkout.
SOURCES = ("pyproject.toml", "README.md", "producer", "worker")

pytestmark = pytest.mark.slow


def pip(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def build_wheel(folder: Path) -> Path:
    source = folder / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # Without build isolation when setuptools is here: no download of the build backend, a few seconds.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    built = pip("wheel", str(source), "--no-deps", *isolation, "-w", str(folder / "dist"))
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (folder / "dist").glob("belle_queue-*.whl")
    return wheel


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A venv holding the wheel and the client's dependencies from the package index (pip's cache reused)."""
    folder = tmp_path_factory.mktemp("packaging")
    reachable = pip("download", "--no-deps", "--dest", str(folder / "probe"), "redis>=5", timeout=60)
    if reachable.returncode != 0:
        pytest.skip(f"the package index cannot be reached: {(reachable.stderr.strip().splitlines() or ['no reason given'])[-1]}")
    wheel = build_wheel(folder)
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    installed = pip("--python", str(venv / "bin" / "python"), "install", str(wheel))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A command of the venv, away from the checkout (cwd elsewhere, no BELLE_ setting, no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BELLE_") and k != "PYTHONPATH"}
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def test_the_wheel_ships_the_configs_and_the_client_runs_without_the_gpu_stack(client_venv, new_database, tmp_path):
    probe = ("import importlib.util, json, producer, producer.settings as s; "
             "print(json.dumps({'gpu_stack': [m for m in ('torch', 'transformers') if importlib.util.find_spec(m)], "
             "'producer': producer.__file__, 'configs': str(s.get_settings().configs_dir)}))")
    shown = run(client_venv, "python", "-c", probe, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    where = json.loads(shown.stdout)
    assert where["gpu_stack"] == [], "torch and transformers are not client dependencies"
    installed = str(client_venv.resolve())
    assert Path(where["producer"]).resolve().is_relative_to(installed) and Path(where["configs"]).resolve().is_relative_to(installed), where
    for name in ("presets.yaml", "models/smollm2-135m.yaml", "models/belle-7b-2m.yaml", "hardware/a100-80g.yaml"):
        assert (Path(where["configs"]) / name).is_file(), f"{name} is not in the wheel"

    presets = yaml.safe_load((SHIPPED / "presets.yaml").read_text(encoding="utf-8"))
    listed = run(client_venv, "belle-queue", "presets", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [line.split(":")[0] for line in listed.stdout.splitlines() if not line.startswith(" ")] == list(presets)

    url = new_database()
    submitted = run(client_venv, "belle-queue", "--redis-url", url, "submit", "--prompt", "你好", "--preset", "precise_qa", cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    lines = tmp_path / "prompts.jsonl"
    lines.write_text("".join(json.dumps({"custom_id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(3)), encoding="utf-8")
    batch = run(client_venv, "belle-queue", "--redis-url", url, "batch", "submit", str(lines), "--preset", "greedy", "--json", cwd=tmp_path)
    assert batch.returncode == 0, batch.stderr
    submission = json.loads(batch.stdout)
    assert (submission["total"], submission["created"], submission["refused"]) == (3, 3, 0)

    with JobClient(Settings(redis_url=url)) as client:
        record = client.get(job_id)
        assert record.state is JobState.QUEUED
        assert {k: record.request[k] for k in presets["precise_qa"]["parameters"]} == presets["precise_qa"]["parameters"]
        status = client.batch_status(submission["batch_id"])
        assert (status.total, status.queued) == (3, 3)
        records = [client.get(job_id) for job_id in client.redis.lrange(keys.batch_jobs(submission["batch_id"]), 0, -1)]
        assert [(r.custom_id, r.state, r.request["max_new_tokens"]) for r in records] == [(f"p{i}", JobState.QUEUED, 200) for i in range(3)]
