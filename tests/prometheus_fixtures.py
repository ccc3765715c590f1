"""A real Prometheus (Debian `prometheus`) on a free loopback port, with its own temporary config
and data directory, scraping given targets every second. Always stopped at teardown.

`observed`: such a Prometheus scraping the real service (-L user/model/subscription, -l,
--quota-metrics, the model catalog) while a token workload runs through its HTTP API, plus a small
emitter of vLLM and DCGM series.

`LimitadorEmitter`: what a plain Kuadrant Limitador's /metrics serves (its series only, no catalog,
no quota gauges), growing per scrape; `catalog_exporter`: the real `ratelimit-exporter` serving
only a model catalog, as it runs next to a plain Limitador."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from dashboards.generate import DASHBOARDS
from dashboards.perses import with_all_values
from ratelimit.tools.processes import free_ports, running, stop_process
from tests.service_fixtures import ServiceProcess
from tests.support import EXAMPLES, REPO

STARTUP_TIMEOUT = 30.0
SCRAPE_INTERVAL = "1s"

OBSERVABILITY = EXAMPLES / "observability"
EXTERNAL, GPU = "maas-demo/gpt-4o", "maas-demo/qwen3-8b-kserve-route"
# (user, subscription, tokens per call): alice runs into the free 2000-token window, bob never does.
CALLERS = (("alice", "free", 300), ("bob", "premium", 10), ("carol", "premium", 5))


def all_values(query: str) -> str:
    """A dashboard query as Perses sends it with every variable at "All" (`.*`)."""
    return with_all_values(query, [v for build in DASHBOARDS for v in build().variables])


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

    def label_values(self, label: str, *matchers: str) -> list[str]:
        """The values of `label` on the series any of `matchers` selects (as a Perses variable asks)."""
        answer = self.http.get(f"/api/v1/label/{label}/values", params={"match[]": list(matchers)}).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def output(self) -> str:
        return (self.work_dir / "prometheus.log").read_text(errors="replace")

    def stop(self) -> None:
        self.http.close()
        stop_process(self.process)
        self.log.close()


def require_prometheus() -> None:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (scripts/test installs it: apt-get install prometheus)")


@contextlib.contextmanager
def running_prometheus(targets: dict[str, Sequence[str]]) -> Iterator[PrometheusProcess]:
    """A started PrometheusProcess scraping `targets`, in a temporary directory; stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="prometheus-") as work_dir:
        prometheus = PrometheusProcess(targets, Path(work_dir))
        try:
            yield prometheus.start()
        finally:
            prometheus.stop()


@pytest.fixture
def start_prometheus() -> Iterator:
    """Factory: `start_prometheus({"job": ["127.0.0.1:8080"]})`; every one started is stopped."""
    require_prometheus()
    with contextlib.ExitStack() as started:
        yield lambda targets: started.enter_context(running_prometheus(targets))


class Emitter:
    """A real HTTP target serving `render(scrapes so far)` as Prometheus text, on a free port."""

    def __init__(self, render: Callable[[int], str]) -> None:
        self.scrapes = 0
        emitter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                emitter.scrapes += 1
                body = render(emitter.scrapes).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Emitter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# Routes as the MaaS controller names them: an inference.opendatahub.io ExternalModel's route is the
# model's name, a legacy one `maas-<name>`, an LLMInferenceService's `<name>-kserve-route`. `granite`
# is GPU-served behind a hand-made route without the suffix: only a catalog can place it.
PLAIN_ROUTES = {"maas-demo/qwen3-14b": "qwen3-14b", "maas-demo/maas-gpt-4o": "gpt-4o",
                "maas-demo/qwen3-8b-kserve-route": "qwen3-8b", "maas-demo/granite": "granite"}
PLAIN_CATALOG = {"models": [
    {"limitador_namespace": "maas-demo/qwen3-14b", "model": "qwen3-14b", "kind": "external", "provider": "openai"},
    {"limitador_namespace": "maas-demo/qwen3-8b-kserve-route", "model": "qwen3-8b", "kind": "gpu"},
    {"limitador_namespace": "maas-demo/granite", "model": "granite", "kind": "gpu"},
]}  # maas-demo/maas-gpt-4o is left out: the convention places it


def limitador_exposition(scrapes: int, suffix: str = "") -> str:
    """Limitador's /metrics (limitador-server prometheus_metrics.rs through metrics-exporter-prometheus:
    `# TYPE` lines, counters without `_total`) under a MaaS TelemetryPolicy's labels and `-l`; `suffix`
    `_total` is what an OpenTelemetry pipeline makes of it. alice is refused on every route, bob never."""
    lines = []
    families: dict[str, list[str]] = {"authorized_calls": [], "authorized_hits": [], "limited_calls": []}
    for route, model in PLAIN_ROUTES.items():
        for user, subscription, calls, tokens, refused in (("alice", "free", 3, 300, 1), ("bob", "premium", 2, 40, 0)):
            labels = f'limitador_namespace="{route}",model="{model}",subscription="{subscription}",user="{user}"'
            families["authorized_calls"].append(f"{{{labels}}} {calls * scrapes}")
            families["authorized_hits"].append(f"{{{labels}}} {tokens * scrapes}")
            if refused:
                limit_name = f"maas-demo-{subscription}-{model}-tokens"
                families["limited_calls"].append(f'{{{labels},limit_name="{limit_name}"}} {refused * scrapes}')
    for name, samples in families.items():
        lines.append(f"# TYPE {name}{suffix} counter")
        lines.extend(f"{name}{suffix}{sample}" for sample in samples)
        lines.append("")
    lines += ["# TYPE limitador_up gauge", "limitador_up 1", ""]
    return "\n".join(lines)


class LimitadorEmitter(Emitter):
    def __init__(self, suffix: str = "") -> None:
        super().__init__(lambda scrapes: limitador_exposition(scrapes, suffix))


@contextlib.contextmanager
def catalog_exporter(work_dir: Path) -> Iterator[str]:
    """The real `ratelimit-exporter` (memory storage: no counters) serving PLAIN_CATALOG; yields its address."""
    models = work_dir / "models.yaml"
    models.write_text(yaml.safe_dump(PLAIN_CATALOG))
    port = free_ports(1)[0]
    command = [sys.executable, "-m", "exporter.main", str(OBSERVABILITY / "limits.yaml"), "memory",
               "-B", "127.0.0.1", "-P", str(port), "--model-catalog", str(models)]
    url = f"http://127.0.0.1:{port}/metrics"
    with running("ratelimit-exporter", command, lambda: httpx.get(url, timeout=1.0).status_code == 200,
                 work_dir / "exporter.log", not_ready_yet=(httpx.TransportError,), cwd=REPO):
        yield f"127.0.0.1:{port}"


class GpuEmitter(Emitter):
    """vLLM (KServe-prefixed) and DCGM series in their real formats; counters grow per scrape."""

    def __init__(self) -> None:
        super().__init__(self.render)

    @staticmethod
    def render(n: int) -> str:
        labels = 'model_name="qwen3-8b",engine="0"'
        dcgm = 'gpu="0",UUID="GPU-1",device="nvidia0",modelName="NVIDIA L40S",Hostname="node-1"'
        lines = [
            f"kserve_vllm:prompt_tokens_total{{{labels}}} {100 * n}",
            f"kserve_vllm:generation_tokens_total{{{labels}}} {250 * n}",
            f"kserve_vllm:num_requests_waiting{{{labels}}} 2",
            f"kserve_vllm:num_requests_running{{{labels}}} 5",
            f"kserve_vllm:kv_cache_usage_perc{{{labels}}} 0.42",
            *(f'kserve_vllm:time_to_first_token_seconds_bucket{{{labels},le="{le}"}} {n * share}'
              for le, share in (("0.1", 2), ("0.5", 8), ("1.0", 10), ("+Inf", 10))),
            f"kserve_vllm:time_to_first_token_seconds_count{{{labels}}} {10 * n}",
            f"kserve_vllm:time_to_first_token_seconds_sum{{{labels}}} {3.1 * n}",
            f"DCGM_FI_DEV_GPU_UTIL{{{dcgm}}} 87",
            f"DCGM_FI_DEV_FB_USED{{{dcgm}}} 30123",
            f"DCGM_FI_DEV_POWER_USAGE{{{dcgm}}} 281.5",
        ]
        return "\n".join(lines) + "\n"


class Workload:
    """Token calls through the HTTP API in a thread until stopped: the "while a workload runs"."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stopped = threading.Event()
        self.statuses: dict[tuple[str, int], int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10.0) as client:
            while not self.stopped.is_set():
                for namespace, model in ((EXTERNAL, "gpt-4o"), (GPU, "qwen3-8b")):
                    for user, subscription, tokens in CALLERS:
                        answer = client.post("/check_and_report", json={
                            "namespace": namespace, "delta": tokens,
                            "values": {"user": user, "model": model, "subscription": subscription}})
                        key = (user, answer.status_code)
                        self.statuses[key] = self.statuses.get(key, 0) + 1
                self.stopped.wait(0.05)

    def __enter__(self) -> Workload:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


@pytest.fixture(scope="module")
def observed() -> Iterator[tuple[PrometheusProcess, Workload]]:
    """One for the module: its tests only read what Prometheus has scraped, which keeps growing."""
    require_prometheus()
    service = ServiceProcess(
        OBSERVABILITY / "limits.yaml", "-L", str(OBSERVABILITY / "metric-labels.yaml"), "--quota-metrics",
        "--model-catalog", str(OBSERVABILITY / "models.yaml"), "-l")
    try:
        service.start()
        with GpuEmitter() as emitter, Workload(service.url) as workload, running_prometheus(
                {"ratelimit": [f"127.0.0.1:{service.http_port}"], "vllm": [emitter.address]}) as prometheus:
            yield prometheus, workload
    finally:
        service.close()
