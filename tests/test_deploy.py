"""The Dockerfile and the Kubernetes manifests in deploy/: schema-valid, consistent with each other and
with the ServiceMonitor, and the image's install steps work in a fresh virtual environment."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ratelimit.limits import parse_limits
from tests.conftest import EXAMPLES, REPO

DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
SERVICE_MONITOR = REPO / "dashboards" / "generated" / "servicemonitor.yaml"
# The schemas ship inside the pinned kubernetes-validate wheel: nothing is downloaded at run time.
KUBERNETES_VERSION = "1.30.0"


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in deploy/ (the kustomization is kustomize's, not the API server's)."""
    return [(path, document) for path in sorted(DEPLOY.rglob("*.yaml")) if path.name != "kustomization.yaml"
            for document in yaml.safe_load_all(path.read_text()) if document]


def find(kind: str, name: str) -> dict[str, Any]:
    [found] = [doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize(("path", "document"), manifests(),
                         ids=lambda v: v.name if isinstance(v, Path) else v["kind"] if isinstance(v, dict) else None)
def test_manifests_are_valid_against_the_kubernetes_schemas(path: Path, document: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{path.relative_to(REPO)}: {document['kind']} {document['metadata']['name']}: "
                    f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_kustomization_lists_the_service_manifests() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def test_the_service_has_the_ports_the_service_monitor_scrapes_and_envoy_calls() -> None:
    service, deployment = find("Service", "ratelimit"), find("Deployment", "ratelimit")
    monitor = yaml.safe_load(SERVICE_MONITOR.read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert {"http", "grpc"} <= ports.keys()
    assert "http" in {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]}
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert {port["targetPort"] for port in ports.values()} <= container_ports.keys()
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # Probes: gRPC health on the gRPC port, /status on the HTTP one.
    assert container["readinessProbe"]["grpc"]["port"] == container_ports["grpc"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/status", "port": "http"}
    env = {item["name"]: item["value"] for item in container["env"]}
    assert int(env["HTTP_API_PORT"]) == container_ports["http"] and int(env["ENVOY_RLS_PORT"]) == container_ports["grpc"]


def test_the_mounted_limits_configmap_holds_the_tier_limits() -> None:
    deployment = find("Deployment", "ratelimit")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    [mount] = [m for m in container["volumeMounts"] if env["LIMITS_FILE"].startswith(m["mountPath"] + "/")]
    assert "subPath" not in mount  # a subPath mount never sees ConfigMap updates: no hot reload
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = find("ConfigMap", volume["configMap"]["name"])
    text = config_map["data"][Path(env["LIMITS_FILE"]).name]
    ours = [limit.to_dict() for limit in parse_limits(text)]
    assert ours == [limit.to_dict() for limit in parse_limits((EXAMPLES / "tiers.yaml").read_text())]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines()  # type: ignore[misc]
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_is_slim_non_root_with_healthcheck_and_serve_entrypoint() -> None:
    instructions = dockerfile_instructions()
    values = {name: value for name, value in instructions}  # the last of each, as Docker applies them
    assert values["FROM"].endswith("-slim")
    assert values["USER"] not in ("root", "0")
    assert "/status" in values["HEALTHCHECK"] and "HTTP_API_PORT" in values["HEALTHCHECK"]
    assert yaml.safe_load(values["ENTRYPOINT"]) == ["ratelimit", "serve"]
    assert "deploy/install.sh" in values["RUN"]


def test_dockerfile_install_steps_in_a_fresh_venv(tmp_path: Path) -> None:
    """SLOW (a minute or more; pip reaches PyPI, or its cache): copies what the Dockerfile COPYs, runs
    deploy/install.sh on it as the image build does, then uses the installed `ratelimit`."""
    source = tmp_path / "src"
    for name, value in dockerfile_instructions():
        if name == "COPY":  # relative to WORKDIR /src; `COPY a b ./` copies into, `COPY a a` copies as
            *origins, destination = value.split()
            for origin in origins:
                target = source / destination / Path(origin).name if destination.endswith("/") else source / destination
                target.parent.mkdir(parents=True, exist_ok=True)
                if (REPO / origin).is_dir():
                    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
                    shutil.copytree(REPO / origin, target, symlinks=True, ignore=ignore)
                else:
                    shutil.copy2(REPO / origin, target)
    venv = tmp_path / "venv"
    done = subprocess.run(["sh", str(source / "deploy" / "install.sh"), str(source), str(venv)],
                          capture_output=True, text=True, timeout=600)  # generous: 2 shared cores
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    validated = subprocess.run([str(venv / "bin" / "ratelimit"), "validate", str(EXAMPLES / "tiers.yaml")],
                               capture_output=True, text=True, cwd=tmp_path)
    assert validated.returncode == 0, validated.stderr
    translated = subprocess.run([str(venv / "bin" / "ratelimit"), "translate", str(EXAMPLES / "maas")],
                                capture_output=True, text=True, cwd=tmp_path)
    assert translated.returncode == 0, translated.stderr
    assert len(parse_limits(translated.stdout)) == 4
