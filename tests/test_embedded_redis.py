"""The embedded redis-server (`belle-queue redis`, the demo, the tests): persistent by default (AOF
everysec, no eviction) and kept across restarts, ephemeral on request, and a one-line reason in redis-server's
own words when it cannot start. All with the real binary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import redis

from producer.embedded_redis import EmbeddedRedis, EmbeddedRedisError, free_port

CONFIG = ("appendonly", "appendfsync", "maxmemory-policy", "maxmemory", "save")


def config_of(url: str) -> dict[str, str]:
    with redis.Redis.from_url(url, decode_responses=True) as client:
        return {key: client.config_get(key)[key] for key in CONFIG}


def test_by_default_it_keeps_an_append_only_file_and_what_was_written_survives_a_restart(tmp_path):
    folder = tmp_path / "not" / "yet" / "there"
    port = free_port()
    with EmbeddedRedis(port=port, data_dir=folder, maxmemory="64mb") as server:
        config = config_of(server.url)
        assert {k: config[k] for k in ("appendonly", "appendfsync", "maxmemory-policy", "maxmemory")} == {
            "appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction", "maxmemory": str(64 * 1024 * 1024)}
        with redis.Redis.from_url(server.url) as client:
            client.set("kept", "yes")
    assert any(name.startswith("appendonly") for name in os.listdir(folder)), os.listdir(folder)
    with EmbeddedRedis(port=port, data_dir=folder) as server:
        with redis.Redis.from_url(server.url, decode_responses=True) as client:
            assert client.get("kept") == "yes"
        assert config_of(server.url)["maxmemory"] == "0"


def test_ephemeral_keeps_nothing(tmp_path):
    port = free_port()
    with EmbeddedRedis(port=port, data_dir=tmp_path, ephemeral=True) as server:
        config = config_of(server.url)
        assert (config["appendonly"], config["save"], config["maxmemory-policy"]) == ("no", "", "noeviction")
        with redis.Redis.from_url(server.url) as client:
            client.set("kept", "no")
    assert os.listdir(tmp_path) == []
    with EmbeddedRedis(port=port, data_dir=tmp_path, ephemeral=True) as server:
        with redis.Redis.from_url(server.url) as client:
            assert client.get("kept") is None


def test_a_bad_option_is_refused_in_redis_servers_words_and_leaves_no_process():
    server = EmbeddedRedis(ephemeral=True, args=["--maxmemory", "lots"])
    with pytest.raises(EmbeddedRedisError) as refusal:
        server.start()
    assert "redis-server exited with code 1" in str(refusal.value) and "argument must be a memory value" in str(refusal.value)
    assert "\n" not in str(refusal.value) and server.process is None


def redis_command(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "producer.cli", "redis", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def stop(command: subprocess.Popen) -> tuple[int, str]:
    command.send_signal(signal.SIGTERM)
    code = command.wait(30)
    stderr = command.stderr.read()
    command.stdout.close()
    command.stderr.close()
    return code, stderr


def test_the_redis_command_persists_in_the_folder_given_and_says_what_it_keeps(tmp_path):
    folder = tmp_path / "data"
    command = redis_command("--dir", str(folder), "--maxmemory", "2GB")
    url = command.stdout.readline().strip()
    assert url.startswith("redis://127.0.0.1:"), command.stderr.read() if command.poll() is not None else url
    config = config_of(url)
    code, stderr = stop(command)
    assert (config["appendonly"], config["appendfsync"], config["maxmemory-policy"], config["maxmemory"]) == ("yes", "everysec", "noeviction", str(2 << 30))
    assert code == 0 and f"append-only file (appendfsync everysec) in {folder}; maxmemory 2gb, maxmemory-policy noeviction" in stderr, stderr
    assert any(name.startswith("appendonly") for name in os.listdir(folder))


def test_without_dir_the_redis_command_persists_in_its_data_folder_setting_and_states_no_memory_limit(tmp_path):
    folder = tmp_path / "default"
    command = redis_command(env={"BELLE_REDIS_DATA_DIR": str(folder)})
    url = command.stdout.readline().strip()
    assert url, command.stderr.read()
    assert config_of(url)["maxmemory"] == "0"
    code, stderr = stop(command)
    assert code == 0 and f"in {folder}; maxmemory unlimited" in stderr, stderr
    assert any(name.startswith("appendonly") for name in os.listdir(folder))


def test_a_port_in_use_is_one_line_with_redis_servers_reason(redis_server):
    done = subprocess.run([sys.executable, "-m", "producer.cli", "redis", "--ephemeral", "--port", str(redis_server.port)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: redis-server exited with code 1:") and "Address already in use" in done.stderr, done.stderr


def test_a_data_folder_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    done = subprocess.run([sys.executable, "-m", "producer.cli", "redis", "--dir", str(tmp_path / "a-file" / "data")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"cannot create the data folder {tmp_path / 'a-file' / 'data'} (Not a directory)" in done.stderr


def test_a_memory_limit_redis_cannot_read_is_refused_on_the_command_line():
    done = subprocess.run([sys.executable, "-m", "producer.cli", "redis", "--maxmemory", "2 gigs"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--maxmemory: must be a size such as 512mb or 2gb" in done.stderr
