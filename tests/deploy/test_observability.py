"""Dashboards, alerts and scraping, checked without a cluster: `promtool check rules` on the alert
rules (and on every dashboard query, as recording rules, so their PromQL parses), every metric
they name is one the services export, the dashboard JSON is well formed, and compose and
Kubernetes scrape every service on its metrics port."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from corral.libs import metrics as kit
from corral.libs.config import SERVICE_NAMES, Settings
from corral.services.identity import metrics as identity
from corral.services.runtime import metrics as runtime
from corral.services.session import metrics as session

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "corral-dashboard.json"
K8S = ROOT / "deploy" / "k8s"
METRICS_PORT = 9464
EXPORTED = {*kit.EXPORTED, *identity.EXPORTED, *runtime.EXPORTED, *session.EXPORTED}
SUFFIXES = ("_bucket", "_count", "_sum")
# Panel types of Grafana's core that the dashboard may use.
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "table", "bargauge", "text"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed (Debian: apt-get install prometheus)")
        pytest.skip("promtool is not installed")
    return path


def metric_names(expr: str) -> set[str]:
    """The Corral metric families an expression reads (histogram series by their family)."""
    names = set()
    for name in re.findall(r"\bcorral_[a-z0-9_]+", expr):
        for suffix in SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in EXPORTED:
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alerts_cover_what_pages_someone_and_name_exported_metrics() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    for needed in (
        "CorralHighErrorRate",
        "CorralTurnFailures",
        "CorralTurnQueueStuck",
        "CorralDatabasePoolSaturated",
        "CorralBudgetExhausted",
        "CorralCertificateExpiresSoon",
    ):
        assert needed in names
    for rule in rules:
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        unknown = metric_names(rule["expr"]) - EXPORTED
        assert not unknown, f"{rule['alert']} reads metrics nobody exports: {unknown}"


def test_metric_names_of_a_family_are_recognised() -> None:
    # The check above must be able to fail: a made-up name is not exported.
    assert metric_names("rate(corral_rpc_server_duration_seconds_bucket[5m])") <= EXPORTED
    assert metric_names("corral_no_such_metric_total") - EXPORTED == {"corral_no_such_metric_total"}


def test_dashboard_is_well_formed() -> None:
    data = dashboard()
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
        assert key in data, key
    assert isinstance(data["schemaVersion"], int) and data["schemaVersion"] >= 36
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"] for v in data["templating"]["list"]}
    cells: set[tuple[int, int]] = set()
    for panel in data["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(grid["y"] + r, grid["x"] + c) for r in range(grid["h"]) for c in range(grid["w"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["type"] == "prometheus"
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            used = set(re.findall(r"\$\{?(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, f"{panel['title']}: undefined variables {used}"


def test_dashboard_panels_read_metrics_the_services_export() -> None:
    read: set[str] = set()
    for expr in queries():
        names = metric_names(expr)
        assert names, f"a query that reads no Corral metric: {expr}"
        assert not names - EXPORTED, f"{expr} reads metrics nobody exports: {names - EXPORTED}"
        read |= names
    # Every family is on the dashboard, but a certificate's expiry (TLS only) is too.
    assert read == EXPORTED


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query becomes a recording rule that promtool parses (Grafana's variables filled)."""
    rules = [
        {
            "record": f"corral:dashboard_query_{i}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$job", ".*"),
        }
        for i, expr in enumerate(queries())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_pods_are_scraped_on_their_metrics_port() -> None:
    config = next(doc for doc in yaml.safe_load_all((K8S / "config.yaml").read_text()) if doc)
    assert Settings(metrics_port=int(config["data"]["CORRAL_METRICS_PORT"])).metrics_port == (
        METRICS_PORT
    )
    for name in SERVICE_NAMES:
        deployment = next(
            doc
            for doc in yaml.safe_load_all((K8S / f"{name}.yaml").read_text())
            if doc and doc["kind"] == "Deployment"
        )
        template = deployment["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/port"] == str(METRICS_PORT), name
        assert annotations["prometheus.io/path"] == "/metrics", name
        (container,) = template["spec"]["containers"]
        assert {"name": "metrics", "containerPort": METRICS_PORT} in container["ports"], name


def test_compose_prometheus_scrapes_every_service_and_envoy_stats() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["x-corral"]["environment"]["CORRAL_METRICS_PORT"] == str(METRICS_PORT)
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (corral,) = jobs["corral"]["static_configs"]
    assert sorted(corral["targets"]) == sorted(f"{n}:{METRICS_PORT}" for n in SERVICE_NAMES)
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    prometheus = compose["services"]["prometheus"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in prometheus["volumes"] if ":ro" in volume)
    assert mounts["./deploy/prometheus/alerts.yml"] in config["rule_files"]
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    grafana = compose["services"]["grafana"]
    assert any(v.startswith("./deploy/grafana/corral-dashboard.json:") for v in grafana["volumes"])
    # Neither is published beyond the host's loopback; the edge stays the only public port.
    for name in ("prometheus", "grafana"):
        assert all(p.startswith("127.0.0.1:") for p in compose["services"][name]["ports"])


def test_envoy_stats_are_scrapeable_apart_from_the_public_edge() -> None:
    rendered = yaml.safe_load((ROOT / "deploy" / "envoy" / "envoy.production.yaml").read_text())
    listeners = {item["name"]: item for item in rendered["static_resources"]["listeners"]}
    assert set(listeners) == {"edge", "stats"}
    stats = listeners["stats"]
    port = stats["address"]["socket_address"]["port_value"]
    assert port != listeners["edge"]["address"]["socket_address"]["port_value"]
    manager = stats["filter_chains"][0]["filters"][0]["typed_config"]
    [host] = manager["route_config"]["virtual_hosts"]
    assert host["routes"] == [
        {"match": {"path": "/stats/prometheus"}, "route": {"cluster": "envoy_admin"}}
    ]
    assert rendered["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    documents = list(yaml.safe_load_all((K8S / "envoy.yaml").read_text()))
    deployment = next(d for d in documents if d and d["kind"] == "Deployment")
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert template["metadata"]["annotations"]["prometheus.io/path"] == "/stats/prometheus"
    service = next(d for d in documents if d and d["kind"] == "Service")
    assert [p["port"] for p in service["spec"]["ports"]] == [8080], "the edge alone is public"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["envoy"]["ports"] == ["8080:8080"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    envoy_job = next(j for j in config["scrape_configs"] if j["job_name"] == "envoy")
    assert envoy_job["static_configs"][0]["targets"] == [f"envoy:{port}"]
