"""Limitador's configuration, end to end: real service processes started the way a Limitador image
or the limitador-operator starts them (environment variables, `limitador-server`, no arguments),
real Redis shared by two processes, reloaded label files, JSON logs, and spans received by a real
OTLP/gRPC receiver."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest, RateLimitResponse

from ratelimit.tools.otlp_receiver import OtlpReceiver
from tests.redis_fixtures import RedisServer
from tests.service_fixtures import ServiceProcess
from tests.support import EXAMPLES, wait_until

StartService = Callable[..., ServiceProcess]

RATELIMIT = [sys.executable, "-m", "ratelimit.cli"]
LIMITADOR_SERVER = [str(Path(sys.executable).parent / "limitador-server")]


def user_limits(tmp_path: Path, namespace: str, max_value: int = 3) -> Path:
    path = tmp_path / "limits.yaml"
    path.write_text(
        f"- namespace: {namespace}\n  name: per-user\n  max_value: {max_value}\n  seconds: 600\n"
        "  conditions: []\n  variables: [\"descriptors[0]['user']\"]\n"
    )
    return path


def call(service: ServiceProcess, namespace: str, user: str, delta: int = 1, **extra: object) -> int:
    body = {"namespace": namespace, "values": {"user": user, **extra}, "delta": delta}
    return service.http.post("/check_and_report", json=body).status_code


def test_limits_file_from_the_environment_with_no_arguments(start_service: StartService) -> None:
    """`LIMITS_FILE=... ratelimit`: a Limitador container's way to start."""
    limits = EXAMPLES / "tiers.yaml"
    service = start_service(None, env={"LIMITS_FILE": str(limits)}, launcher=RATELIMIT)
    assert service.status()["limits_source"] == str(limits)
    assert service.status()["config_version"] == 1


def test_redis_url_makes_two_processes_share_counters(
    start_service: StartService, redis_server: RedisServer, tmp_path: Path
) -> None:
    """`REDIS_URL=redis://... ratelimit LIMITS_FILE`: Redis storage, as Limitador's env fallback, so
    replicas share one budget (with memory storage each would grant the whole of it)."""
    namespace = f"shared-{uuid.uuid4().hex[:8]}"
    limits = user_limits(tmp_path, namespace, max_value=3)
    env = {"REDIS_URL": redis_server.url}
    first = start_service(limits, env=env, launcher=RATELIMIT)
    second = start_service(limits, env=env, launcher=RATELIMIT)

    assert [call(first, namespace, "ann"), call(second, namespace, "ann"), call(first, namespace, "ann")] == [200] * 3
    assert call(second, namespace, "ann") == 429
    assert call(first, namespace, "ann") == 429
    [counter] = second.http.get(f"/counters/{namespace}").json()
    assert counter["remaining"] == 0
    keys = redis_server.client().keys(f"*{namespace}*")
    assert keys, "the counter lives in Redis"


def test_redis_url_with_local_cache_enabled_is_redis_cached(
    start_service: StartService, redis_server: RedisServer, tmp_path: Path
) -> None:
    namespace = f"cached-{uuid.uuid4().hex[:8]}"
    env = {"REDIS_URL": redis_server.url, "REDIS_LOCAL_CACHE_ENABLED": "1",
           "REDIS_LOCAL_CACHE_FLUSHING_PERIOD_MS": "50"}
    service = start_service(user_limits(tmp_path, namespace), "-vv", env=env, launcher=RATELIMIT)
    assert call(service, namespace, "bo") == 200
    assert "redis_cached storage" in service.output()
    wait_until(lambda: redis_server.client().keys(f"*{namespace}*"), timeout=20, what="the write-behind flush")


@pytest.mark.parametrize("variable, value", [("DISK_PATH", "/var/lib/limitador"),
                                             ("REDIS_LOCAL_CACHE_TTL_RATIO_CACHED_COUNTERS", "10")])
def test_unsupported_limitador_settings_stop_the_start(
    variable: str, value: str, tmp_path: Path
) -> None:
    service = ServiceProcess(user_limits(tmp_path, "x"), env={variable: value}, launcher=RATELIMIT)
    with pytest.raises(RuntimeError, match=f"exited with 2:(.|\n)*{variable}"):
        service.start()
    service.close()


def test_limitador_server_command_and_version(start_service: StartService, tmp_path: Path) -> None:
    """The `limitador-server` console script takes the limitador-operator's arguments."""
    namespace = "operator"
    service = start_service(user_limits(tmp_path, namespace), "memory", launcher=LIMITADOR_SERVER)
    assert call(service, namespace, "cy") == 200
    import subprocess

    version = subprocess.run([*LIMITADOR_SERVER, "-V"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("ratelimit ")


def test_api_spec_is_served_where_limitador_serves_it(start_service: StartService) -> None:
    service = start_service(EXAMPLES / "tiers.yaml")
    spec = service.http.get("/api/spec")
    assert spec.status_code == 200
    assert spec.json() == service.http.get("/openapi.json").json()
    assert "/check_and_report" in spec.json()["paths"]


def test_custom_labels_file_is_reloaded(start_service: StartService, tmp_path: Path) -> None:
    """Limitador reloads `-L` like the limits file: new calls get the new labels; a bad version
    keeps the labels in use."""
    namespace = "labelled"
    labels = tmp_path / "labels.yaml"
    labels.write_text("user: descriptors[0]['user']\n")
    service = start_service(user_limits(tmp_path, namespace, 100), "-L", str(labels), "--reload-interval", "0.1")
    call(service, namespace, "dee")
    assert 'authorized_calls{limitador_namespace="labelled",user="dee"} 1' in service.http.get("/metrics").text

    labels.write_text("tier: descriptors[0]['tier']\n")

    def relabelled() -> bool:
        call(service, namespace, "dee", tier="gold")
        return 'authorized_calls{limitador_namespace="labelled",tier="gold"}' in service.http.get("/metrics").text

    wait_until(relabelled, timeout=20, interval=0.2, what="the reloaded labels")
    assert "applied 1 custom metric labels" in service.output()
    labels.write_text("not a label: [\n")
    wait_until(lambda: "custom metric labels file rejected" in service.output(), timeout=20, what="the rejection")
    call(service, namespace, "dee", tier="silver")
    assert 'tier="silver"' in service.http.get("/metrics").text


def test_metric_labels_default_adds_the_map_it_evaluates_to(start_service: StartService, tmp_path: Path) -> None:
    """Also Limitador's `incr_limited_calls_uses_default_labels` (prometheus_metrics.rs): the default
    map labels limited calls too."""
    namespace = "defaults"
    service = start_service(user_limits(tmp_path, namespace, 1), "--metric-labels-default", "descriptors[0]")
    assert call(service, namespace, "eve", model="m1") == 200
    assert call(service, namespace, "eve", foobar="1") == 429
    text = service.http.get("/metrics").text
    assert 'authorized_calls{limitador_namespace="defaults",model="m1",user="eve"} 1' in text
    assert 'limited_calls{foobar="1",limitador_namespace="defaults",user="eve"} 1' in text


def test_structured_logs_are_json_lines_only(start_service: StartService, tmp_path: Path) -> None:
    """Every line the process writes, ours and uvicorn's, at the most verbose level, through a
    reload, a rejected reload and a shutdown, is one JSON object."""
    namespace = "json"
    limits = user_limits(tmp_path, namespace)
    service = start_service(limits, "--structured-logs", "-vvvv", "--reload-interval", "0.1")
    call(service, namespace, "fay")
    service.http.get("/no-such-page")
    limits.write_text(limits.read_text().replace("max_value: 3", "max_value: 4"))
    wait_until(lambda: service.status()["config_version"] == 2, timeout=20, what="the reload")
    limits.write_text("- namespace: json\n  max_value: many\n")
    wait_until(lambda: service.status()["config_err_since"] == 1, timeout=20, what="the rejected reload")
    assert service.stop() == 0

    lines = service.output().splitlines()
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    assert all({"timestamp", "level", "fields", "target"} <= entry.keys() for entry in entries)
    targets = {entry["target"] for entry in entries}
    assert {"uvicorn.error", "uvicorn.access", "ratelimit.sources.limits_file"} <= targets, targets
    reloads = [e for e in entries if e["fields"]["message"].startswith("applied 1 limits")]
    assert [e["level"] for e in reloads] == ["INFO", "INFO"]  # the start and the reload
    assert any(e["level"] == "ERROR" and "rejected" in e["fields"]["message"] for e in entries)


def test_reloads_are_logged_at_the_default_level(start_service: StartService, tmp_path: Path) -> None:
    limits = user_limits(tmp_path, "quiet")
    service = start_service(limits, "--reload-interval", "0.1")
    limits.write_text(limits.read_text().replace("max_value: 3", "max_value: 5"))
    wait_until(lambda: service.status()["config_version"] == 2, timeout=20, what="the reload")
    wait_until(lambda: "(config version 2)" in service.output(), timeout=10, what="the reload's log line")
    line = next(line for line in service.output().splitlines() if "(config version 2)" in line)
    assert " INFO " in line


# -- tracing ----------------------------------------------------------------------------------------


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def traceparent(trace_id: str = TRACE_ID) -> str:
    return f"00-{trace_id}-{PARENT_ID}-01"


def test_decisions_are_traced_over_otlp_with_the_callers_trace(start_service: StartService, tmp_path: Path) -> None:
    """`--tracing-endpoint`: a span per decision reaches a real OTLP/gRPC receiver, child of the
    W3C `traceparent` the caller sent, over HTTP and over gRPC."""
    namespace = "traced"
    with OtlpReceiver() as receiver:
        service = start_service(user_limits(tmp_path, namespace, 1), "--tracing-endpoint", receiver.endpoint)
        body = {"namespace": namespace, "values": {"user": "gus"}, "delta": 1}
        assert service.http.post("/check_and_report", json=body, headers={"traceparent": traceparent()}).status_code == 200

        grpc_trace = "0af7651916cd43dd8448eb211c80319c"
        stub = rls_pb2_grpc.RateLimitServiceStub(service.grpc)
        request = RateLimitRequest(domain=namespace, hits_addend=1, descriptors=[
            RateLimitDescriptor(entries=[RateLimitDescriptor.Entry(key="user", value="gus")])])
        answer = stub.ShouldRateLimit(request, metadata=[("traceparent", traceparent(grpc_trace))], timeout=10)
        assert answer.overall_code == RateLimitResponse.Code.OVER_LIMIT
        service.http.get("/status", headers={"traceparent": traceparent("1" * 32)})  # not a decision

        http_span = receiver.wait_for(lambda span: span.trace_id == TRACE_ID)
        grpc_span = receiver.wait_for(lambda span: span.trace_id == grpc_trace)

    assert (http_span.name, http_span.parent_span_id) == ("check_and_report", PARENT_ID)
    assert http_span.attributes == {"ratelimit.namespace": namespace, "http.response.status_code": 200,
                                    "ratelimit.limited": False}
    assert (grpc_span.name, grpc_span.parent_span_id) == ("should_rate_limit", PARENT_ID)
    assert grpc_span.attributes == {"ratelimit.namespace": namespace, "ratelimit.hits_addend": 1,
                                    "ratelimit.limited": True}
    assert http_span.resource["service.name"] == "limitador"
    assert all(span.trace_id != "1" * 32 for span in receiver.spans)


def test_tracing_endpoint_that_is_down_does_not_stop_decisions(start_service: StartService, tmp_path: Path) -> None:
    """Spans leave in the background: an absent collector costs the decisions nothing visible."""
    namespace = "untraced"
    service = start_service(user_limits(tmp_path, namespace, 5), "--tracing-endpoint", "http://127.0.0.1:9")
    assert [call(service, namespace, "hal") for _ in range(6)] == [200] * 5 + [429]
    stub = rls_pb2_grpc.RateLimitServiceStub(service.grpc)
    # A malformed traceparent starts a new trace instead of failing the call.
    answer = stub.ShouldRateLimit(RateLimitRequest(domain=namespace), timeout=10, metadata=[("traceparent", "garbage")])
    assert answer.overall_code == RateLimitResponse.Code.OK
