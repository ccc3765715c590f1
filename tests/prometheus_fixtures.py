"""A real Prometheus (Debian `prometheus`) on a free loopback port, with its own temporary config
and data directory, scraping given targets every second. Always stopped at teardown."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import free_ports

STARTUP_TIMEOUT = 30.0
SCRAPE_INTERVAL = "1s"


class PrometheusProcess:
    def __init__(self, targets: dict[str, Sequence[str]], work_dir: Path) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.work_dir = work_dir
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(addresses)}]}
                               for job, addresses in targets.items()],
        }
        self.config_file = work_dir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.log = (work_dir / "prometheus.log").open("wb")
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=10.0)

    def start(self) -> PrometheusProcess:
        self.process = subprocess.Popen([
            "prometheus", f"--config.file={self.config_file}", f"--storage.tsdb.path={self.work_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
        ], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Prometheus did not become ready:\n{self.output()}")
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        try:
            return self.http.get("/-/ready", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result; a parse error fails the test with Prometheus's message."""
        answer = self.http.get("/api/v1/query", params={"query": promql}).json()
        if answer["status"] != "success":
            pytest.fail(f"Prometheus refused {promql!r}: {answer.get('error')}")
        return answer["data"]["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        answer = self.http.get(f"/api/v1/label/{label}/values", params={"match[]": match}).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def output(self) -> str:
        return (self.work_dir / "prometheus.log").read_text(errors="replace")

    def stop(self) -> None:
        self.http.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture
def start_prometheus() -> Iterator:
    """Factory: `start_prometheus({"job": ["127.0.0.1:8080"]})`; every one started is stopped."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (scripts/test installs it: apt-get install prometheus)")
    started: list[PrometheusProcess] = []
    work_dirs: list[tempfile.TemporaryDirectory[str]] = []

    def start(targets: dict[str, Sequence[str]]) -> PrometheusProcess:
        work_dirs.append(tempfile.TemporaryDirectory(prefix="prometheus-"))
        prometheus = PrometheusProcess(targets, Path(work_dirs[-1].name))
        started.append(prometheus)
        return prometheus.start()

    yield start
    for prometheus in started:
        prometheus.stop()
    for work_dir in work_dirs:
        work_dir.cleanup()
