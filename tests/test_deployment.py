"""docker-compose.yml, the Dockerfile and .dockerignore, kept correct without Docker: the commands they run
are run here (Redis with compose's own arguments, its healthcheck, a worker's healthcheck against a real
worker) or parsed by the same CLI the image runs. Compose's ${VAR:-default} and ${VAR:?error} are
interpolated here as compose does."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import yaml

from producer.cli.commands import build_parser
from producer.embedded_redis import find_redis_server, free_port
from producer.redis_url import parse_sentinel_url
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
RAW_COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PASSWORD = "compose-test-password"
ENVIRONMENT = {"REDIS_PASSWORD": PASSWORD, "FLOWER_BASIC_AUTH": "admin:flower-test"}  # what the compose file requires
REDIS_URL = f"redis://:{PASSWORD}@redis:6379/0"

_VARIABLE = re.compile(r"\$\{(\w+)(?::([-?])((?:(?!\$\{)[^}])*))?\}")  # (an innermost one: defaults may hold variables)


class MissingVariable(KeyError):
    pass


def interpolate(node, environment: dict[str, str]):
    """``node`` as compose reads it: ${VAR}, ${VAR:-default} (unset or empty: the default), ${VAR:?message}
    (unset or empty: an error), nested in defaults."""
    if isinstance(node, dict):
        return {key: interpolate(value, environment) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, environment) for value in node]
    if not isinstance(node, str):
        return node

    def one(match: re.Match) -> str:
        name, kind, rest = match.groups()
        if environment.get(name):
            return environment[name]
        if kind == "?":
            raise MissingVariable(f"{name}: {rest}")
        return rest if kind == "-" else ""

    while (substituted := _VARIABLE.sub(one, node)) != node:
        node = substituted
    return node


COMPOSE = interpolate(RAW_COMPOSE, ENVIRONMENT)
SERVICES = COMPOSE["services"]
WORKERS = {name: s for name, s in SERVICES.items() if name.startswith("worker-")}


def test_compose_refuses_to_start_redis_and_its_clients_without_a_password():
    for name in ("redis", "worker-gpu0", "gateway", "flower", "exporter"):
        with pytest.raises(MissingVariable, match="REDIS_PASSWORD"):
            interpolate(RAW_COMPOSE["services"][name], {"FLOWER_BASIC_AUTH": "a:b"})
    with pytest.raises(MissingVariable, match="FLOWER_BASIC_AUTH"):
        interpolate(RAW_COMPOSE["services"]["flower"], {"REDIS_PASSWORD": PASSWORD})


def test_redis_runs_with_aof_everysec_no_eviction_a_password_and_a_memory_cap_as_compose_starts_it(tmp_path):
    service = SERVICES["redis"]
    command = service["command"]
    assert command[0] == "redis-server"
    assert all(not port.startswith(("6379", "0.0.0.0")) for port in service.get("ports", [])), "Redis is not published beyond the host's loopback"
    port = free_port()
    process = subprocess.Popen([find_redis_server(), *command[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=PASSWORD, decode_responses=True)

    def answers() -> bool:
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    try:
        wait_for(answers, 10, "the compose redis-server answers with the password")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        config = {key: client.config_get(key)[key] for key in ("appendonly", "appendfsync", "maxmemory-policy", "maxmemory")}
        assert config == {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction", "maxmemory": str(4 * 1024**3)}
        client.close()
        check = service["healthcheck"]["test"]
        if shutil.which("redis-cli") is None:
            pytest.skip("no redis-cli here to run the healthcheck with")
        assert check[0] == "CMD-SHELL"
        shell = check[1].replace("redis-cli", f"redis-cli -p {port}")

        def healthcheck(password: str) -> int:
            return subprocess.run(["sh", "-c", shell], env={**os.environ, **service["environment"], "REDISCLI_AUTH": password}).returncode

        assert service["environment"]["REDISCLI_AUTH"] == PASSWORD
        assert healthcheck(PASSWORD) == 0
        assert healthcheck("wrong") != 0, "a Redis that refuses the password is not healthy"
    finally:
        process.terminate()
        process.wait(10)


def test_redis_maxmemory_is_set_from_the_environment():
    command = interpolate(RAW_COMPOSE, {**ENVIRONMENT, "REDIS_MAXMEMORY": "512mb"})["services"]["redis"]["command"]
    assert command[command.index("--maxmemory") + 1] == "512mb"


def test_every_worker_service_runs_a_valid_worker_command_on_its_own_gpu():
    assert len(WORKERS) >= 2
    gpus, ports, hostnames = [], [], []
    for name, service in WORKERS.items():
        args = build_parser().parse_args(service["command"])
        assert args.command == "worker" and args.device == "cuda" and args.gpus is None
        assert args.name == f"belle-{name.removeprefix('worker-')}@%h"  # belle-gpu0@<container host>
        assert service["hostname"] == name, "a stable host name: the Celery node name survives a re-creation"
        hostnames.append(service["hostname"])
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
        env = service["environment"]
        assert env["BELLE_REDIS_URL"] == REDIS_URL and "BELLE_MODEL" in env
        assert env["BELLE_METRICS_PORT"] != "9100", "node_exporter's port"
        assert env["BELLE_METRICS_HOST"] == "0.0.0.0"
        (published,) = service["ports"]
        host, host_port, container_port = published.split(":")
        assert host == "127.0.0.1" and container_port == env["BELLE_METRICS_PORT"]
        ports.append(host_port)
        assert "./configs:/app/configs:ro" in service["volumes"] and "./models:/models:ro" in service["volumes"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        health = service["healthcheck"]["test"]
        assert health[:2] == ["CMD", "belle-queue"]
        checked = build_parser().parse_args(health[2:])
        assert checked.command == "health" and checked.worker == args.name, "the healthcheck looks at this worker"
    assert len(set(gpus)) == len(gpus) and len(set(ports)) == len(ports) and len(set(hostnames)) == len(hostnames), \
        "each worker has its GPU, its metrics port and its host name"


def test_a_one_gpu_host_starts_only_the_gpu0_worker_by_default():
    by_default = [name for name, service in WORKERS.items() if not service.get("profiles")]
    assert by_default == ["worker-gpu0"]
    assert all(service["profiles"] == ["gpu2"] for name, service in WORKERS.items() if name != "worker-gpu0")
    assert SERVICES["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0"]


@pytest.mark.slow
def test_the_worker_healthcheck_passes_for_a_live_worker_and_fails_when_it_hangs(new_database, start_worker, bloom_config):
    """The compose healthcheck's own command line, against a real worker started with the service's --name
    (%h expands to this host's name on both sides); SIGSTOP stands for a hung process."""
    service = SERVICES["worker-gpu0"]
    url = new_database()
    name = build_parser().parse_args(service["command"]).name
    worker = start_worker(bloom_config, name=name, redis_url=url)
    command = [sys.executable, "-m", "producer.cli", *service["healthcheck"]["test"][2:]]
    environment = {**os.environ, "BELLE_REDIS_URL": url}

    def healthcheck() -> subprocess.CompletedProcess:
        return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)

    healthy = healthcheck()
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout.startswith("ok: worker belle-gpu0@")
    other = subprocess.run([*command[:-1], "belle-gpu9@%h"], env=environment, capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and "is not announced" in other.stderr
    worker.process.send_signal(signal.SIGSTOP)
    try:
        failed = wait_for(lambda: (done := healthcheck()).returncode != 0 and done, 30, "the healthcheck fails once the worker hangs")
        assert failed.returncode == 1 and "unhealthy" in failed.stderr
    finally:
        worker.process.send_signal(signal.SIGCONT)
    wait_for(lambda: healthcheck().returncode == 0, 30, "the healthcheck passes again once the worker moves on")
    unreachable = subprocess.run(command, env={**environment, "BELLE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, capture_output=True,
                                 text=True, timeout=60)
    assert unreachable.returncode == 4, "Redis unreachable: unhealthy too"


def test_flower_follows_the_same_broker_behind_basic_auth_on_loopback():
    flower = SERVICES["flower"]
    assert f"--broker={REDIS_URL}" in flower["command"] and "flower" in flower["command"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == ENVIRONMENT["FLOWER_BASIC_AUTH"]
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])


def test_the_dockerfile_copies_what_exists_and_installs_extras_that_exist():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", dockerfile, flags=re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), path
    extras = re.search(r'"\.\[([a-z,]+)\]"', dockerfile).group(1).split(",")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert all(re.search(rf"^{extra} = ", pyproject, flags=re.MULTILINE) for extra in extras)
    assert 'ENTRYPOINT ["belle-queue"]' in dockerfile and "BELLE_CONFIGS_DIR=/app/configs" in dockerfile


def test_the_image_installs_the_torch_the_project_is_tested_with_from_a_cuda_index():
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^TORCH \?= (\S+)$", makefile, flags=re.MULTILINE).group(1)
    assert re.search(r"^ARG TORCH=(\S+)$", dockerfile, flags=re.MULTILINE).group(1) == pinned == "torch==2.13.0"
    index = re.search(r"^ARG TORCH_INDEX=(\S+)$", dockerfile, flags=re.MULTILINE).group(1)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu(126|130|132)", index), f"torch 2.13.0 has CUDA builds cu126, cu130, cu132; got {index}"


def test_the_dockerignore_keeps_what_the_dockerfile_copies_and_leaves_out_the_rest():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    for must in (".git", ".venv", ".venv-vllm", "models", "**/__pycache__", ".pytest_cache", ".hypothesis", "tests"):
        assert must in ignored, must
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = [path for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", dockerfile, flags=re.MULTILINE) for path in source.split()]
    assert copied and not set(copied) & set(ignored)


def test_the_gateway_service_runs_a_valid_gateway_command():
    service = SERVICES["gateway"]
    args = build_parser().parse_args(service["command"])
    assert args.command == "gateway" and args.host == "0.0.0.0" and args.port == 8000
    assert service["environment"]["BELLE_REDIS_URL"] == REDIS_URL


def test_the_monitoring_services_run_under_their_profile_with_files_that_exist():
    for name in ("exporter", "prometheus", "grafana"):
        service = SERVICES[name]
        assert service["profiles"] == ["monitoring"], name
        assert all(port.startswith("127.0.0.1:") for port in service.get("ports", [])), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_dir(), volume
    args = build_parser().parse_args(SERVICES["exporter"]["command"])
    assert args.command == "exporter" and args.host == "0.0.0.0"
    assert SERVICES["exporter"]["environment"]["BELLE_REDIS_URL"] == REDIS_URL
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "deploy/grafana/dashboards" / Path(home).name).is_file()


HA = interpolate(RAW_COMPOSE, ENVIRONMENT)["services"]
SENTINEL_URL = next(line.split("=", 1)[1].strip().strip('"') for line in (ROOT / "docker-compose.yml").read_text().splitlines()
                    if line.startswith("#   export BELLE_REDIS_URL="))


def test_the_ha_profile_adds_a_replica_of_redis_and_three_sentinels_that_monitor_it_and_clients_can_take_their_url():
    added = {name for name, service in HA.items() if service.get("profiles") == ["ha"]}
    assert added == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    primary, replica = HA["redis"]["command"], HA["redis-replica"]["command"]
    assert replica[: replica.index("--replica-announce-ip")] == primary[: primary.index("--replica-announce-ip")], "the same options"
    assert replica[replica.index("--replicaof") + 1:] == ["redis", "6379"]
    for command in (primary, replica):  # either may be the other's replica after a failover
        assert command[command.index("--masterauth") + 1] == PASSWORD
    url = parse_sentinel_url(SENTINEL_URL.replace("$REDIS_PASSWORD", PASSWORD))
    assert {host for host, _ in url.sentinels} == {f"sentinel-{i}" for i in (1, 2, 3)} and url.password == PASSWORD
    for i in (1, 2, 3):
        script = HA[f"sentinel-{i}"]["command"][2]
        assert f"sentinel monitor {url.master_name} redis 6379 2" in script and HA[f"sentinel-{i}"]["hostname"] == f"sentinel-{i}"
    with_url = interpolate(RAW_COMPOSE, {**ENVIRONMENT, "BELLE_REDIS_URL": SENTINEL_URL})["services"]
    assert all(with_url[name]["environment"]["BELLE_REDIS_URL"] == SENTINEL_URL for name in ("worker-gpu0", "gateway", "exporter"))


def test_a_sentinel_started_with_the_compose_script_monitors_the_primary_with_its_password(tmp_path):
    """The sentinel service's own script (its hosts mapped to loopback ports), against Redis as compose starts it."""
    port, sentinel_port = free_port(), free_port()
    primary = subprocess.Popen([find_redis_server(), *HA["redis"]["command"][1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    script = (HA["sentinel-1"]["command"][2].replace("$$", "$").replace("/data", str(tmp_path)).replace("redis 6379", f"127.0.0.1 {port}")
              .replace("port 26379", f"port {sentinel_port}").replace("$(hostname)", "127.0.0.1").replace("exec redis-server", f"exec {find_redis_server()}"))
    sentinel = subprocess.Popen(["sh", "-c", script], env={**os.environ, **HA["sentinel-1"]["environment"]},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=sentinel_port, password=PASSWORD, decode_responses=True, socket_timeout=2)

    def watching():
        try:
            return client.sentinel_master("belle")
        except redis.RedisError:
            return None

    try:
        master = wait_for(watching, 20, "the sentinel watches the primary")
        wait_for(lambda: "s_down" not in (watching() or {"flags": "s_down"})["flags"] and watching()["role-reported"] == "master", 20,
                 "the sentinel reaches the primary with its password")
        assert int(master["port"]) == port and int(master["quorum"]) == 2
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=sentinel_port, socket_timeout=2).ping()
    finally:
        for process in (sentinel, primary):
            process.terminate()
            process.wait(10)
