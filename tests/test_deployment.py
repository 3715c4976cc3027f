"""docker-compose.yml and the Dockerfile, kept correct without Docker: the commands they run are run
here (Redis with compose's own arguments) or parsed by the same CLI the image runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import redis
import yaml

from producer.cli.commands import build_parser
from producer.embedded_redis import EmbeddedRedis, find_redis_server, free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_redis_runs_with_aof_everysec_and_no_eviction_as_compose_starts_it(tmp_path):
    command = COMPOSE["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    port = free_port()
    process = subprocess.Popen([find_redis_server(), *command[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        EmbeddedRedis(port=port, data_dir=tmp_path).wait_ready()
        client = redis.Redis(port=port, decode_responses=True)
        config = {key: client.config_get(key)[key] for key in ("appendonly", "appendfsync", "maxmemory-policy")}
        assert config == {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}
        client.close()
    finally:
        process.terminate()
        process.wait(10)


def test_every_worker_service_runs_a_valid_worker_command_on_its_own_gpu():
    workers = {name: s for name, s in COMPOSE["services"].items() if name.startswith("worker-")}
    assert len(workers) >= 2
    gpus, ports = [], []
    for name, service in workers.items():
        args = build_parser().parse_args(service["command"])
        assert args.command == "worker" and args.device == "cuda" and args.gpus is None
        assert args.name == f"belle-{name.removeprefix('worker-')}@%h"  # belle-gpu0@<container host>
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
        ports.append(service["ports"][0].split(":")[0])
        env = service["environment"]
        assert env["BELLE_REDIS_URL"] == "redis://redis:6379/0" and "BELLE_MODEL" in env
        assert "./configs:/app/configs:ro" in service["volumes"] and "./models:/models:ro" in service["volumes"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert len(set(gpus)) == len(gpus) and len(set(ports)) == len(ports), "each worker has its GPU and its metrics port"


def test_flower_follows_the_same_broker():
    command = COMPOSE["services"]["flower"]["command"]
    assert "--broker=redis://redis:6379/0" in command and "flower" in command


def test_the_dockerfile_copies_what_exists_and_installs_extras_that_exist():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", dockerfile, flags=re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), path
    extras = re.search(r'"\.\[([a-z,]+)\]"', dockerfile).group(1).split(",")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert all(re.search(rf"^{extra} = ", pyproject, flags=re.MULTILINE) for extra in extras)
    assert 'ENTRYPOINT ["belle-queue"]' in dockerfile and "BELLE_CONFIGS_DIR=/app/configs" in dockerfile


def test_the_gateway_service_runs_a_valid_gateway_command():
    service = COMPOSE["services"]["gateway"]
    args = build_parser().parse_args(service["command"])
    assert args.command == "gateway" and args.host == "0.0.0.0" and args.port == 8000
    assert service["environment"]["BELLE_REDIS_URL"] == "redis://redis:6379/0"
