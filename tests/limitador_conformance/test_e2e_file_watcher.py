"""Limitador's end-to-end jobs (`.github/workflows/e2e.yaml`, `limitador-server/e2e/file-watcher/`,
`limitador-server/sandbox/`), on this machine instead of kind and docker compose.

- `limits_file_watcher` (Kubernetes): the Deployment of `e2e/file-watcher/deployment.yaml` (limits
  from `LIMITS_FILE` only, a ConfigMap mounted as a directory, `/status` probes); the ConfigMap goes
  from max_value 1000 to 2000 and `/limits/test` must show 2000. Here the kubelet's mount is
  rebuilt as kubelet writes it: `..<timestamp>/` directories, a `..data` symlink swapped atomically,
  and `limits.yaml -> ..data/limits.yaml`.
- `limits_file_watcher_on_docker`: `sandbox/docker-compose-limitador-memory.yaml`'s command line
  (Limitador's own argv, no subcommand) on `sandbox/limits.yaml`; a limit is appended in place
  (`cat <<EOF >>`) and `/limits/other_namespace` must list it.

Both jobs' files use Limitador 1.x expressions (`user_id`, `a == '1'`), which Limitador 2 parses
and then never matches; this service refuses them with the 2.x spelling (README.md, deliberate
differences), so the ports use the 2.x spelling and a test each shows the refusal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.limitador_conformance.harness import STARTUP_TIMEOUT, Api
from tests.service_fixtures import ServiceProcess
from tests.support import REPO, wait_until

CONFIGMAP = """---
- namespace: test
  max_value: {max_value}
  seconds: 1
  conditions: []
  variables: ["descriptors[0]['user_id']"]
"""

SANDBOX_LIMITS = """---
- namespace: test_namespace
  max_value: 10
  seconds: 60
  conditions:
    - "descriptors[0]['req.method'] == 'GET'"
    - "descriptors[0]['req.path'] != '/json'"
  variables: []
- namespace: test_namespace
  max_value: 5
  seconds: 60
  conditions:
    - "descriptors[0]['req.method'] == 'POST'"
    - "descriptors[0]['req.path'] != '/json'"
  variables: []
- namespace: test_namespace
  max_value: 50000
  seconds: 10
  conditions:
    - "descriptors[0]['req.method'] == 'GET'"
    - "descriptors[0]['req.path'] == '/json'"
  variables: []
"""

APPENDED = """- namespace: other_namespace
  max_value: 1
  seconds: 10
  conditions:
    - "{condition}"
  variables: []
"""


class LimitadorProcess(ServiceProcess):
    """The service started with exactly the argv and environment a Limitador deployment uses."""

    def __init__(self, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        super().__init__(None, env=env)
        self.argv = [part.format(http_port=self.http_port, rls_port=self.rls_port) for part in argv]

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "ratelimit.cli", *self.argv]


@pytest.fixture
def limitador() -> Iterator[list[LimitadorProcess]]:
    started: list[LimitadorProcess] = []
    yield started
    for process in started:
        process.close()


class ConfigMapVolume:
    """A directory laid out as the kubelet mounts a ConfigMap, with its atomic update."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.generation = 0

    def publish(self, files: Mapping[str, str]) -> None:
        self.generation += 1
        payload = self.directory / f"..2026_12_01_00_00_{self.generation:02d}.000000000"
        payload.mkdir()
        for name, text in files.items():
            (payload / name).write_text(text)
            link = self.directory / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        staging = self.directory / "..data_tmp"
        staging.symlink_to(payload.name)
        os.replace(staging, self.directory / "..data")


def test_limits_file_watcher_in_k8s(tmp_path: Path, limitador: list[LimitadorProcess]) -> None:
    """`limits_file_watcher` job, e2e.yaml: the Deployment reads `LIMITS_FILE` from its env, its
    probes use `/status`, and an updated ConfigMap (max_value 1000 -> 2000) is served."""
    volume = ConfigMapVolume(tmp_path)
    volume.publish({"limits.yaml": CONFIGMAP.format(max_value=1000)})
    env = {
        "RUST_LOG": "debug", "LIMITS_FILE": str(tmp_path / "limits.yaml"),
        "HTTP_API_HOST": "127.0.0.1", "HTTP_API_PORT": "{http_port}",
        "ENVOY_RLS_HOST": "127.0.0.1", "ENVOY_RLS_PORT": "{rls_port}",
    }
    process = LimitadorProcess([])
    process.extra_env = {key: value.format(http_port=process.http_port, rls_port=process.rls_port)
                         for key, value in env.items()}
    limitador.append(process)
    process.start(timeout=STARTUP_TIMEOUT)
    api = Api(process)
    assert process.http.get("/status").status_code == 200
    assert [entry["max_value"] for entry in api.limits("test")] == [1000]

    volume.publish({"limits.yaml": CONFIGMAP.format(max_value=2000)})
    wait_until(lambda: [entry["max_value"] for entry in api.limits("test")] == [2000], timeout=30,
               what="the updated ConfigMap to be served")


def test_limits_file_watcher_on_docker(tmp_path: Path, limitador: list[LimitadorProcess]) -> None:
    """`limits_file_watcher_on_docker` job, e2e.yaml: the sandbox's three limits are served, and a
    limit appended to the file in place shows up in its own namespace. The job's own appended
    text (`a == '1'`, a Limitador 1.x condition) is refused first: `/status` says where and gives
    the 2.x form, and the sandbox limits stay served; the 2.x spelling is then taken."""
    limits = tmp_path / "limits.yaml"
    limits.write_text(SANDBOX_LIMITS)
    process = LimitadorProcess([
        "--rls-ip", "127.0.0.1", "--rls-port", "{rls_port}", "--http-ip", "127.0.0.1", "--http-port", "{http_port}",
        "-vvv", "--grpc-reflection-service", "--rate-limit-headers", "DRAFT_VERSION_03", str(limits), "memory",
    ])
    limitador.append(process)
    process.start(timeout=STARTUP_TIMEOUT)
    api = Api(process)
    assert process.http.get("/status").status_code == 200
    assert len(api.limits("test_namespace")) == 3

    with limits.open("a") as appending:
        appending.write(APPENDED.format(condition="a == '1'"))
    wait_until(lambda: process.status()["config_err_since"] > 0, timeout=30, what="the refused reload")
    status = process.status()
    assert "conditions[0]" in status["config_error"]
    assert "descriptors[0]['a'] == '1'" in status["config_error"]
    assert api.limits("other_namespace") == []
    assert len(api.limits("test_namespace")) == 3

    limits.write_text(SANDBOX_LIMITS + APPENDED.format(condition="descriptors[0]['a'] == '1'"))
    wait_until(lambda: len(api.limits("other_namespace")) == 1, timeout=30, what="the appended limit")
    assert len(api.limits("test_namespace")) == 3


def test_limits_file_watcher_configmap_1x_variable_is_refused(tmp_path: Path) -> None:
    """`e2e/file-watcher/configmap.yaml` as written (`variables: ["user_id"]`, a Limitador 1.x
    variable): refused at load with the 2.x form, where Limitador 2 would load a limit that never
    applies (`--validate`, Limitador's own check, is `ratelimit validate` here)."""
    path = tmp_path / "limits.yaml"
    path.write_text(CONFIGMAP.format(max_value=1000).replace("[\"descriptors[0]['user_id']\"]", '["user_id"]'))
    result = subprocess.run([sys.executable, "-m", "ratelimit.cli", "validate", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "variables[0]" in result.stderr and "descriptors[0]['user_id']" in result.stderr
