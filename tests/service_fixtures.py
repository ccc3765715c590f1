"""The real service as a subprocess on free loopback ports: `ServiceProcess`, and the
`start_service` fixture.

    def test_something(start_service):
        service = start_service("examples/tiers.yaml")
        service.http.get("/status")

Every process started here is stopped at teardown (terminate, then kill), pass or fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ratelimit.tools.processes import free_ports, stop_process
from tests.support import REPO

# Generous: a first start after a kernel change compiles the numba kernels (a minute on 2 busy cores).
STARTUP_TIMEOUT = 120.0


class ServiceProcess:
    """`ratelimit serve` in a subprocess, with HTTP and gRPC on free loopback ports.

    Output goes to a temporary file rather than a pipe: a chatty process can never block on a full
    pipe, and `output()` shows it when a test fails.
    """

    host = "127.0.0.1"

    def __init__(
        self, limits_file: str | os.PathLike[str] | None, *args: str, env: Mapping[str, str] | None = None,
        launcher: Sequence[str] | None = None,
    ) -> None:
        self.limits_file = None if limits_file is None else Path(limits_file)
        """None: no LIMITS_FILE argument, so the service picks its default."""
        self.http_port, self.rls_port = free_ports(2, self.host)
        self.args: Sequence[str] = args
        self.launcher = launcher
        """A program to run exactly as given, followed by `args` (e.g. `["limitador-server"]`); the
        addresses then come from Limitador's environment variables, as in a Deployment."""
        self.extra_env = dict(env or {})
        if launcher is not None:
            self.extra_env.update({"HTTP_API_HOST": self.host, "HTTP_API_PORT": str(self.http_port),
                                   "ENVOY_RLS_HOST": self.host, "ENVOY_RLS_PORT": str(self.rls_port)})
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] = tempfile.TemporaryFile()
        self.url = f"http://{self.host}:{self.http_port}"
        self.http = httpx.Client(base_url=self.url, timeout=10.0)
        self.grpc_target = f"{self.host}:{self.rls_port}"
        # Reconnect quickly: the default backoff (1 s, growing) would outlast a service restart.
        self.grpc = grpc.insecure_channel(self.grpc_target, options=[("grpc.max_reconnect_backoff_ms", 200)])
        """A channel to the gRPC server, for stubs (`RateLimitServiceStub(service.grpc)`)."""

    @property
    def command(self) -> list[str]:
        if self.launcher is not None:
            return [*self.launcher, *([] if self.limits_file is None else [str(self.limits_file)]), *self.args]
        return [
            sys.executable, "-m", "ratelimit.cli", "serve",
            *([] if self.limits_file is None else [str(self.limits_file)]),
            "-B", self.host, "-P", str(self.http_port), "-b", self.host, "-p", str(self.rls_port),
            *self.args,
        ]

    def start(self, timeout: float = STARTUP_TIMEOUT) -> ServiceProcess:
        # Limitador's variables from the developer's shell must not leak into the test.
        env = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARIABLES}
        env.update(self.extra_env)
        self.process = subprocess.Popen(self.command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not (self._answers_status() and self._grpc_serving()):
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"service not up (/status, gRPC health) within {timeout:g}s:\n{self.output()}")
            time.sleep(0.05)
        return self

    def _answers_status(self) -> bool:
        try:
            return self.http.get("/status", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def _grpc_serving(self) -> bool:
        """The HTTP and gRPC servers start side by side: one answering says nothing of the other."""
        try:
            answer = health_pb2_grpc.HealthStub(self.grpc).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def status(self) -> dict:
        response = self.http.get("/status")
        response.raise_for_status()
        return response.json()

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def stop(self, signum: int = signal.SIGTERM) -> int | None:
        """Signal it (SIGTERM, as Kubernetes does), kill it if it lingers; returns the exit code."""
        self.http.close()
        self.grpc.close()
        return stop_process(self.process, signum)

    def close(self) -> None:
        self.stop()
        self._log.close()


_SERVICE_VARIABLES = frozenset({
    "LIMITS_FILE", "HTTP_API_HOST", "HTTP_API_PORT", "ENVOY_RLS_HOST", "ENVOY_RLS_PORT", "RATE_LIMIT_HEADERS",
    "LIMIT_NAME_IN_PROMETHEUS_LABELS", "RATELIMIT_API_TOKEN", "RATELIMIT_RELOAD_INTERVAL", "TRACING_ENDPOINT",
    "RUST_LOG", "REDIS_URL", "REDIS_LOCAL_CACHE_ENABLED", "REDIS_LOCAL_CACHE_FLUSHING_PERIOD_MS",
    "REDIS_LOCAL_CACHE_BATCH_SIZE", "REDIS_LOCAL_CACHE_MAX_TTL_CACHED_COUNTERS_MS",
    "REDIS_LOCAL_CACHE_TTL_RATIO_CACHED_COUNTERS", "DISK_PATH", "DISK_OPTIMIZE",
})


@pytest.fixture
def start_service(request: pytest.FixtureRequest) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory: `start_service(limits_file, *extra_args, env=None)` starts a service and returns it
    once /status answers; every one started is stopped at teardown. On failure its output is shown."""
    started: list[ServiceProcess] = []

    def start(
        limits_file: str | os.PathLike[str] | None, *args: str, env: Mapping[str, str] | None = None,
        launcher: Sequence[str] | None = None, timeout: float = STARTUP_TIMEOUT,
    ) -> ServiceProcess:
        service = ServiceProcess(limits_file, *args, env=env, launcher=launcher)
        started.append(service)
        return service.start(timeout)

    yield start
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for service in started:
        service.stop()
        if failed:
            sys.stderr.write(f"--- output of {' '.join(service.command)}\n{service.output()}\n")
        service.close()
