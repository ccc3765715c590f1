"""Limitador's sandbox (`limitador-server/sandbox/`: `make deploy-in-memory`, `envoy.yaml`,
`limits.yaml`, README "Downstream traffic" and "GRPC RateLimitService endpoint"): a real Envoy
in front of an upstream, asking the service with the sandbox's descriptors (`req.method`,
`req.path` from the request headers, domain `test_namespace`, `failure_mode_deny`), the service
started with the sandbox's command line. Docker compose and httpbin are replaced by child
processes on free ports (the upstream is the project's OpenAI-compatible one: which status it
answers does not matter, only whether Envoy let the request through).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest, RateLimitResponse

from ratelimit.tools.processes import free_ports
from tests.envoy_fixtures import HOST, Envoy, Upstream
from tests.limitador_conformance.harness import STARTUP_TIMEOUT
from tests.limitador_conformance.test_e2e_file_watcher import SANDBOX_LIMITS, LimitadorProcess


def sandbox_bootstrap(listener: int, admin: int, upstream: int, limitador: int) -> dict[str, Any]:
    """sandbox/envoy.yaml, on loopback ports and with static clusters instead of compose's DNS."""

    def cluster(name: str, port: int, **extra: Any) -> dict[str, Any]:
        endpoint = {"endpoint": {"address": {"socket_address": {"address": HOST, "port_value": port}}}}
        return {"name": name, "connect_timeout": "1s", "type": "STATIC",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]}, **extra}

    rate_limits = [{"actions": [
        {"request_headers": {"header_name": ":method", "descriptor_key": "req.method"}},
        {"request_headers": {"header_name": ":path", "descriptor_key": "req.path"}},
    ]}]
    manager_type = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    manager = {
        "@type": f"type.googleapis.com/{manager_type}",
        "stat_prefix": "ingress_http",
        "route_config": {"name": "local_route", "virtual_hosts": [{
            "name": "local_service", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream", "rate_limits": rate_limits}}],
        }]},
        "http_filters": [
            {"name": "envoy.filters.http.ratelimit", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                "domain": "test_namespace", "failure_mode_deny": True, "timeout": "3s",
                "rate_limit_service": {"transport_api_version": "V3",
                                       "grpc_service": {"envoy_grpc": {"cluster_name": "limitador"}}},
            }},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    http2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}
    return {
        "static_resources": {
            "listeners": [{"name": "main", "address": {"socket_address": {"address": HOST, "port_value": listener}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": manager}]}]}],
            "clusters": [cluster("upstream", upstream),
                         cluster("limitador", limitador, typed_extension_protocol_options=http2)],
        },
        "admin": {"address": {"socket_address": {"address": HOST, "port_value": admin}}},
    }


@pytest.fixture(scope="module")
def sandbox(
    tmp_path_factory: pytest.TempPathFactory, openai_upstream: Upstream,
) -> Iterator[tuple[LimitadorProcess, Envoy]]:
    directory: Path = tmp_path_factory.mktemp("sandbox")
    limits = directory / "limits.yaml"
    limits.write_text(SANDBOX_LIMITS)
    limitador = LimitadorProcess([
        "--rls-ip", "127.0.0.1", "--rls-port", "{rls_port}", "--http-ip", "127.0.0.1", "--http-port", "{http_port}",
        "-vvv", "--grpc-reflection-service", "--rate-limit-headers", "DRAFT_VERSION_03", str(limits), "memory",
    ])
    envoy: Envoy | None = None
    try:
        limitador.start(timeout=STARTUP_TIMEOUT)
        # The first decision loads the storage kernels, which can take longer than Envoy waits.
        warm_up = RateLimitRequest(domain="warm-up", descriptors=[RateLimitDescriptor(
            entries=[RateLimitDescriptor.Entry(key="k", value="v")])])
        rls_pb2_grpc.RateLimitServiceStub(limitador.grpc).ShouldRateLimit(warm_up, timeout=60)
        listener, admin = free_ports(2, HOST)
        envoy = Envoy(sandbox_bootstrap(listener, admin, openai_upstream.port, limitador.rls_port), directory)
        envoy.start(timeout=60)
        yield limitador, envoy
    finally:
        if envoy is not None:
            envoy.stop()
        limitador.close()


def test_sandbox_downstream_traffic(sandbox: tuple[LimitadorProcess, Envoy]) -> None:
    """Sandbox "Downstream traffic" (`curl -H "Host: example.com" :18000/get`) with
    sandbox/limits.yaml: GETs (not to /json) get 10 per minute, POSTs 5, GETs to /json 50000.
    Envoy answers 429 once a limit is spent, with the service's draft-03 headers (`-H`)."""
    _, envoy = sandbox
    with httpx.Client(base_url=envoy.url, headers={"Host": "example.com"}, timeout=30) as client:
        gets = [client.get("/get") for _ in range(11)]
        assert [r.status_code == 429 for r in gets] == [False] * 10 + [True]
        assert gets[-1].headers["X-RateLimit-Limit"] == "10, 10;w=60"
        assert gets[-1].headers["X-RateLimit-Remaining"] == "0"
        posts = [client.post("/post") for _ in range(6)]
        assert [r.status_code == 429 for r in posts] == [False] * 5 + [True]
        assert client.get("/json").status_code != 429  # its own 50000 per 10 s
    assert envoy.stat("cluster.upstream.ratelimit.over_limit") == 2


def test_sandbox_grpc_rate_limit_service_endpoint(sandbox: tuple[LimitadorProcess, Envoy]) -> None:
    """Sandbox README "Limitador's GRPC RateLimitService endpoint": repeated ShouldRateLimit calls
    of `POST /` (`hits_addend` 1) answer OVER_LIMIT after 5."""
    limitador, _ = sandbox
    stub = rls_pb2_grpc.RateLimitServiceStub(limitador.grpc)
    request = RateLimitRequest(domain="test_namespace", hits_addend=1, descriptors=[RateLimitDescriptor(entries=[
        RateLimitDescriptor.Entry(key="req.method", value="POST"), RateLimitDescriptor.Entry(key="req.path", value="/"),
    ])])
    codes = [stub.ShouldRateLimit(request, timeout=30).overall_code for _ in range(6)]
    # POSTs through Envoy (the test above) count on the same limit, which has no variables: fewer
    # than 5 may be left, but never more, and once refused every call is.
    admitted = codes.index(RateLimitResponse.OVER_LIMIT)
    assert admitted <= 5
    assert codes == [RateLimitResponse.OK] * admitted + [RateLimitResponse.OVER_LIMIT] * (6 - admitted)
