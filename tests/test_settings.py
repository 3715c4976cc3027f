"""Settings come from the environment or a YAML file, and every one is documented in the README."""

from __future__ import annotations

from pathlib import Path

from producer.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_a_yaml_settings_file_is_read_and_the_environment_wins(tmp_path, monkeypatch):
    path = tmp_path / "belle.yaml"
    path.write_text("result_ttl_s: 60\nmax_attempts: 5\n")
    monkeypatch.setenv("BELLE_SETTINGS_FILE", str(path))
    monkeypatch.setenv("BELLE_MAX_ATTEMPTS", "7")
    settings = Settings()
    assert (settings.result_ttl_s, settings.max_attempts) == (60, 7)


def test_every_setting_is_documented_once_in_the_readme():
    for name in Settings.model_fields:
        assert README.count(f"| `BELLE_{name.upper()}` |") == 1, name
