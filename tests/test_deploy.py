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
from tests.support import EXAMPLES, REPO

DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
GENERATED = REPO / "dashboards" / "generated"
SERVICE_MONITOR = GENERATED / "servicemonitor.yaml"
# The schemas ship inside the pinned kubernetes-validate wheel: nothing is downloaded at run time.
KUBERNETES_VERSION = "1.30.0"
KUSTOMIZATIONS = ("base", ".", "overlays/all")
"""Every kustomization a user applies (components are rendered through overlays/all)."""
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "PersesDashboard"}
"""CRDs' objects: not in the Kubernetes schemas (their shape is checked in test_dashboards.py)."""


def render_in_python(directory: Path) -> list[dict[str, Any]]:
    """What `kustomize build` gives for the subset deploy/ uses: resources (files or directories),
    components, and JSON 6902 patches with add / replace. Used where kubectl is not installed."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render_in_python(path))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for entry in kustomization.get("components", []):
        component_dir = (directory / entry).resolve()
        component = yaml.safe_load((component_dir / "kustomization.yaml").read_text())
        assert component["kind"] == "Component", component_dir
        objects.extend(render_in_python(component_dir))
        for patch in component.get("patches", []):
            target = patch["target"]
            [obj] = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
            for operation in yaml.safe_load(patch["patch"]):
                _json_patch(obj, operation)
    return objects


def _json_patch(document: dict[str, Any], operation: dict[str, Any]) -> None:
    *parents, last = operation["path"].strip("/").split("/")
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if operation["op"] == "add" and last == "-":
        node.append(operation["value"])
    elif operation["op"] in ("add", "replace"):
        node[int(last) if isinstance(node, list) else last] = operation["value"]
    else:
        raise AssertionError(f"unsupported patch op {operation}")


def render(name: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize deploy/<name>` renders (kubectl when installed, else Python)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return render_in_python(DEPLOY / name)
    done = subprocess.run([kubectl, "kustomize", str(DEPLOY / name)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(kind: str, name: str, kustomization: str = "base") -> dict[str, Any]:
    [found] = [doc for doc in render(kustomization) if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def _identity(document: dict[str, Any]) -> tuple[str, str]:
    return document["kind"], document["metadata"]["name"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_objects_are_valid_against_the_kubernetes_schemas(kustomization: str) -> None:
    for document in render(kustomization):
        if document["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"deploy/{kustomization}: {document['kind']} {document['metadata']['name']}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_python_rendering_is_kustomizes(kustomization: str) -> None:
    """Where kubectl is missing the tests fall back on render_in_python: it must agree with it."""
    ours = sorted(render_in_python(DEPLOY / kustomization), key=_identity)
    assert ours == sorted(render(kustomization), key=_identity)


def test_every_manifest_is_listed_by_its_kustomization() -> None:
    for kustomization_file in DEPLOY.rglob("kustomization.yaml"):
        listed = yaml.safe_load(kustomization_file.read_text()).get("resources", [])
        present = sorted(p.name for p in kustomization_file.parent.glob("*.yaml") if p.name != "kustomization.yaml")
        assert sorted(entry for entry in listed if entry.endswith(".yaml")) == present, kustomization_file


@pytest.mark.parametrize("component, names", [
    ("monitoring", ["servicemonitor.yaml", "prometheusrule.yaml"]),
    ("dashboards", sorted(p.name for p in GENERATED.glob("*.persesdashboard.yaml"))),
])
def test_monitoring_and_dashboard_components_are_the_generated_files(component: str, names: list[str]) -> None:
    """Copies (kustomize reads nothing outside a kustomization's directory): `make deploy-sync`."""
    for name in names:
        assert (DEPLOY / "components" / component / name).read_text() == (GENERATED / name).read_text(), (
            f"deploy/components/{component}/{name} differs from dashboards/generated/: run `make deploy-sync`")


def test_no_pinned_user_ids_for_openshift() -> None:
    """OpenShift's restricted SCC assigns a UID from the namespace's range and rejects others."""
    for document in render("overlays/all"):
        text = yaml.safe_dump(document)
        assert "runAsUser" not in text and "runAsGroup" not in text and "fsGroup" not in text, _identity(document)


def test_the_redis_component_shares_counters_between_replicas() -> None:
    deployment = find("Deployment", "ratelimit", "overlays/all")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    redis_service = find("Service", "ratelimit-redis", "overlays/all")
    assert env["REDIS_URL"] == f"redis://{redis_service['metadata']['name']}:{redis_service['spec']['ports'][0]['port']}"
    assert deployment["spec"]["replicas"] == 2


def test_the_service_monitor_scrapes_the_service_and_the_exporter() -> None:
    monitor = find("ServiceMonitor", "ratelimit", "overlays/all")
    scraped = {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]}
    selected = [doc for doc in render("overlays/all") if doc["kind"] == "Service"
                and monitor["spec"]["selector"]["matchLabels"].items() <= doc["metadata"]["labels"].items()]
    ports = {port["name"] for service in selected for port in service["spec"]["ports"]}
    assert scraped <= ports, (scraped, ports)
    exporter = find("Deployment", "ratelimit-exporter", "overlays/all")
    [container] = exporter["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["ratelimit-exporter"]


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
