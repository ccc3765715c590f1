"""Proof on a real Prometheus: it scrapes the real service (with -L user/model/subscription and
--quota-metrics) while a token workload runs through the HTTP API, plus a small emitter of vLLM
and DCGM series; the seed's four queries and every dashboard query must return data."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from dashboards.generate import external_models, gpu_models, subscriptions
from dashboards.perses import all_queries
from tests.conftest import EXAMPLES, ServiceProcess, wait_until
from tests.prometheus_fixtures import start_prometheus  # noqa: F401 - a fixture

OBSERVABILITY = EXAMPLES / "observability"
EXTERNAL, GPU = "maas-demo/gpt-4o", "maas-demo/qwen3-8b-kserve-route"

# The seed's "MaaS External Models" queries, verbatim but for its demo namespace's route names.
SEED_QUERIES = {
    "authorizedCalls": 'sum(rate(authorized_calls{limitador_namespace=~"maas-demo/.*",limitador_namespace!~".*-kserve-route"}[5m])) by (limitador_namespace)',
    "tokenUsage": 'sum(rate(authorized_hits{limitador_namespace=~"maas-demo/.*",limitador_namespace!~".*-kserve-route"}[5m])) by (limitador_namespace, model)',
    "limitedCalls": 'sum(rate(limited_calls{limitador_namespace=~"maas-demo/.*",limitador_namespace!~".*-kserve-route"}[5m])) by (limitador_namespace, user)',
    "limitadorUp": "limitador_up",
}
# (user, subscription, tokens per call): alice runs into the free 2000-token window, bob never does.
CALLERS = (("alice", "free", 300), ("bob", "premium", 10), ("carol", "premium", 5))


def all_values(query: str) -> str:
    """A dashboard query as Perses sends it with every variable at "All" (`.*`)."""
    return re.sub(r"\$(namespace|model|subscription|user|limit)\b", ".*", query)


class GpuEmitter:
    """vLLM (KServe-prefixed) and DCGM series in their real formats; counters grow per scrape."""

    def __init__(self) -> None:
        self.scrapes = 0
        emitter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                emitter.scrapes += 1
                body = emitter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def render(self) -> str:
        n = self.scrapes
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

    def __enter__(self) -> GpuEmitter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


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


@pytest.fixture
def observed(start_service, start_prometheus) -> Iterator:  # noqa: F811 - pytest fixture injection
    service: ServiceProcess = start_service(
        OBSERVABILITY / "limits.yaml", "-L", str(OBSERVABILITY / "metric-labels.yaml"), "--quota-metrics",
        "--model-catalog", str(OBSERVABILITY / "models.yaml"), "-l")
    with GpuEmitter() as emitter, Workload(service.url) as workload:
        prometheus = start_prometheus({"ratelimit": [f"127.0.0.1:{service.http_port}"], "vllm": [emitter.address]})
        yield prometheus, workload


def _every_query_answers(prometheus, queries: list[str]) -> list[str]:
    """The queries still without data (empty when all answer)."""
    return [q for q in queries if not prometheus.query(all_values(q))]


def test_seed_and_dashboard_queries_answer_on_real_prometheus(observed) -> None:
    prometheus, workload = observed
    dashboards = {build().name: build() for build in (external_models, gpu_models, subscriptions)}
    queries = [q for dashboard in dashboards.values() for q in all_queries(dashboard.spec())]
    wait_until(lambda: not _every_query_answers(prometheus, [*SEED_QUERIES.values(), *queries]), timeout=60,
               interval=1.0, what=f"data for every query; still empty: {_every_query_answers(prometheus, queries)}")
    assert workload.statuses.get(("alice", 429)), "the workload never ran into a limit"

    # The seed's four queries, unchanged, answer; limited_calls names the limited caller only.
    for key, query in SEED_QUERIES.items():
        assert prometheus.query(query), key
    limited_users = {r["metric"].get("user") for r in prometheus.query(SEED_QUERIES["limitedCalls"])}
    assert limited_users == {"alice"}
    tokens = prometheus.query(SEED_QUERIES["tokenUsage"])
    assert {(r["metric"]["limitador_namespace"], r["metric"]["model"]) for r in tokens} == {(EXTERNAL, "gpt-4o")}

    # Every variable of every dashboard offers values.
    for dashboard in dashboards.values():
        for variable in dashboard.variables:
            plugin = variable["spec"]["plugin"]["spec"]
            assert prometheus.label_values(plugin["labelName"], plugin["matchers"][0]), variable["spec"]["name"]

    # Remaining quota of the busiest users: present, and within [0, limit].
    remaining = prometheus.query('ratelimit_quota_remaining{user="alice"}')
    assert remaining
    assert not prometheus.query("ratelimit_quota_remaining > ratelimit_quota_limit")
    assert not prometheus.query("ratelimit_quota_remaining < 0")
