"""Settings come from the environment or a YAML file, and every one is documented in docs/configuration.md,
which is generated from the settings model and linked from the README."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from producer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_a_yaml_settings_file_is_read_and_the_environment_wins(tmp_path, monkeypatch):
    path = tmp_path / "belle.yaml"
    path.write_text("result_ttl_s: 60\nmax_attempts: 5\n")
    monkeypatch.setenv("BELLE_SETTINGS_FILE", str(path))
    monkeypatch.setenv("BELLE_MAX_ATTEMPTS", "7")
    settings = Settings()
    assert (settings.result_ttl_s, settings.max_attempts) == (60, 7)


def test_the_configuration_reference_is_generated_from_the_settings_and_linked_from_the_readme():
    from producer.settings_reference import COMMAND, render

    page = ROOT / "docs" / "configuration.md"
    expected = render()
    assert page.is_file() and page.read_text(encoding="utf-8") == expected, f"docs/configuration.md is out of date; run: {COMMAND}"
    for name in Settings.model_fields:
        assert expected.count(f"| `BELLE_{name.upper()}` |") == 1, name
    assert "](docs/configuration.md)" in (ROOT / "README.md").read_text(encoding="utf-8"), "the README must link docs/configuration.md"


def test_the_configuration_reference_needs_neither_the_worker_nor_torch():
    code = "import sys, producer.settings_reference as r; r.render(); print(sorted({m.split('.')[0] for m in sys.modules} & {'worker', 'torch', 'transformers'}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_settings_command_shows_the_effective_values_with_secrets_masked():
    env = {name: value for name, value in os.environ.items() if not name.upper().startswith("BELLE_")}
    env |= {"BELLE_REDIS_URL": "redis://belle:hunter2@redis.internal:6390/3", "BELLE_MAX_ATTEMPTS": "5",
            "BELLE_WEBHOOK_SECRET": "whsec_topsecret", "BELLE_API_KEYS": "key-one,key-two"}
    text = subprocess.run([sys.executable, "-m", "producer.cli", "settings"], env=env, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert "BELLE_REDIS_URL=redis://belle:***@redis.internal:6390/3  (environment)" in lines
    assert "BELLE_MAX_ATTEMPTS=5  (environment)" in lines and "BELLE_RESULT_TTL_S=86400  (default)" in lines
    assert len(lines) == len(Settings.model_fields)
    shown = subprocess.run([sys.executable, "-m", "producer.cli", "settings", "--json"], env=env, capture_output=True, text=True, timeout=60)
    values = json.loads(shown.stdout)
    assert values["redis_url"] == "redis://belle:***@redis.internal:6390/3" and values["max_attempts"] == 5
    assert values["webhook_secret"] == values["api_keys"] == "***" and values["webhook_timeout_s"] == 10.0
    for secret in ("hunter2", "topsecret", "key-one"):
        assert secret not in text.stdout + shown.stdout
