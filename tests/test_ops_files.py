"""The ops files of deploy/ (Prometheus scrape config and alerts, the Grafana dashboard and its provisioning, the
KEDA ScaledObject) parse, agree with docker-compose.yml, and name only metrics the code exports: the names are
collected from a real `belle-queue exporter`'s scrape and from the worker's and the gateway's own registries,
so that a renamed metric cannot leave a dashboard or an autoscaler reading nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from producer.cli.commands import build_parser
from producer.embedded_redis import free_port
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
ALERTS = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
DASHBOARD = json.loads((DEPLOY / "grafana/dashboards/belle-queue.json").read_text())
KEDA = list(yaml.safe_load_all((DEPLOY / "keda/scaledobject.yaml").read_text()))
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())

METRIC = re.compile(r"\bbelle_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",), "summary": ("_count", "_sum", ""),
            "info": ("_info",)}


def sample_names(families) -> set[str]:
    """The names of the series a family of each type makes (a counter ``x``: ``x_total``...)."""
    return {family.name + suffix for family in families for suffix in SUFFIXES[family.type]}


@pytest.fixture(scope="module")
def fleet_names(new_database) -> set[str]:
    """From a real exporter's scrape (the families it announces, samples or not)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "producer.cli", "--redis-url", new_database(), "exporter", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def scrape():
        assert process.poll() is None, f"the exporter exited with {process.returncode}"
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            return None

    try:
        text = wait_for(scrape, 30, "the exporter answers")
    finally:
        process.terminate()
        process.wait(30)
    names = sample_names(text_string_to_metric_families(text))
    assert "belle_fleet_queue_waiting_jobs" in names and "belle_fleet_jobs_ended_total" in names
    return names


@pytest.fixture(scope="module")
def worker_names() -> set[str]:
    from worker.serving.metrics import Metrics  # (prometheus_client only: no model is loaded)

    return sample_names(Metrics().registry.collect())


@pytest.fixture(scope="module")
def gateway_names() -> set[str]:
    from producer.gateway.app import GatewayMetrics

    return sample_names(GatewayMetrics().registry.collect())


def dashboard_expressions() -> list[str]:
    panels = [p for top in DASHBOARD["panels"] for p in [top, *top.get("panels", [])]]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def alert_expressions() -> list[str]:
    return [rule["expr"] for group in ALERTS["groups"] for rule in group["rules"]]


def keda_expressions() -> list[str]:
    return [trigger["metadata"]["query"] for doc in KEDA for trigger in doc["spec"]["triggers"]]


def names_in(expressions: list[str]) -> set[str]:
    return {name for expression in expressions for name in METRIC.findall(expression)}


@pytest.mark.parametrize("where, expressions", [("grafana", dashboard_expressions()), ("alerts", alert_expressions()), ("keda", keda_expressions())])
def test_every_metric_the_ops_files_name_is_exported(where, expressions, fleet_names, worker_names, gateway_names):
    assert expressions, where
    referenced = names_in(expressions)
    assert referenced, where
    unknown = referenced - (fleet_names | worker_names | gateway_names)
    assert not unknown, f"{where} names metrics nothing exports: {sorted(unknown)}"


def test_the_dashboard_shows_what_an_operator_needs():
    used = names_in(dashboard_expressions())
    wanted = {"belle_fleet_queue_waiting_jobs", "belle_fleet_queue_oldest_waiting_seconds", "belle_generated_tokens_total",
              "belle_time_to_first_token_seconds_bucket", "belle_time_between_tokens_seconds_bucket", "belle_fleet_jobs_ended_total",
              "belle_out_of_memory_total", "belle_fleet_live_workers", "belle_fleet_batch_jobs"}
    assert wanted <= used, sorted(wanted - used)
    assert "rate(belle_generated_tokens_total[1m])" in " ".join(dashboard_expressions())
    assert {p["id"] for p in DASHBOARD["panels"]} == set(range(1, len(DASHBOARD["panels"]) + 1)), "panel ids are unique"
    assert DASHBOARD["templating"]["list"][0] == {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
                                                  "current": {}, "hide": 0}


def test_keda_scales_a_worker_deployment_on_queue_depth_through_prometheus():
    (scaled,) = KEDA
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] and 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        assert trigger["metadata"]["serverAddress"].startswith("http")
        assert float(trigger["metadata"]["threshold"]) > 0
    assert any("belle_fleet_queue_waiting_jobs" in query for query in keda_expressions())


def test_the_scrape_config_finds_what_docker_compose_runs(fleet_names, gateway_names):
    services = COMPOSE["services"]
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    assert set(PROMETHEUS["rule_files"]) == {"alerts.yml"} and (DEPLOY / "prometheus/alerts.yml").is_file()

    (workers,) = jobs["belle-worker"]["dns_sd_configs"]
    compose_workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    assert set(workers["names"]) == set(compose_workers)
    assert {str(workers["port"])} == {s["environment"]["BELLE_METRICS_PORT"] for s in compose_workers.values()}

    exporter = build_parser().parse_args(services["exporter"]["command"])
    assert jobs["belle-fleet"]["static_configs"][0]["targets"] == [f"exporter:{exporter.port}"]
    gateway = build_parser().parse_args(services["gateway"]["command"])
    assert jobs["belle-gateway"]["static_configs"][0]["targets"] == [f"gateway:{gateway.port}"]
    # The gateway job drops the fleet's series (the exporter's job has them), and only those.
    (drop,) = jobs["belle-gateway"]["metric_relabel_configs"]
    assert drop["action"] == "drop" and drop["source_labels"] == ["__name__"]
    assert all(re.fullmatch(drop["regex"], name) for name in fleet_names)
    assert not any(re.fullmatch(drop["regex"], name) for name in gateway_names)


def test_grafana_is_provisioned_with_the_prometheus_of_compose_and_the_dashboard_folder():
    (source,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert any(port.endswith(":9090") for port in COMPOSE["services"]["prometheus"]["ports"])
    (provider,) = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/belle-queue.yml").read_text())["providers"]
    mounts = dict(volume.split(":")[:2] for volume in COMPOSE["services"]["grafana"]["volumes"] if volume.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
