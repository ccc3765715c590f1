"""Limitador server's metrics tests (`limitador-server/src/prometheus_metrics.rs`, `mod tests`),
black-box: calls through the real service's HTTP API and gRPC services, then `GET /metrics` read
with Prometheus' own text parser. Limitador's tests call `incr_*` on its metrics object directly;
here the same counts come from real decisions (`authorized_*` from admitted check_and_report
calls, `limited_calls` from refused ones).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest, RateLimitResponse
from prometheus_client.parser import text_string_to_metric_families

from tests.limitador_conformance.harness import Api, limit, serving
from tests.service_fixtures import ServiceProcess

WHICH = "descriptors[0]['which']"

LIMITS = [
    limit("auth_calls_by_namespace", 100, conditions=(), variables=()),
    limit("auth_calls_by_namespace_two", 100, conditions=(), variables=()),
    limit("limited_calls_by_namespace", 0, conditions=(), variables=()),
    limit("limited_calls_by_namespace_two", 0, conditions=(), variables=()),
    limit("limited_calls_by_limit_name", 0, conditions=(f"{WHICH} == 'some'",), variables=(), name="Some limit"),
    limit("limited_calls_by_limit_name", 0, conditions=(f"{WHICH} == 'another'",), variables=(),
          name="Another limit"),
    limit("limited_calls_empty_name", 0, conditions=(), variables=()),
    limit("limited_calls_custom_labels", 0, conditions=(), variables=()),
]


@pytest.fixture(scope="module")
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """With `-l` (limit_name on limited_calls) and an `-L` file holding Limitador's test label.
    Neither changes the series of the cases without them: an unnamed limit's `limit_name` and a
    label that does not resolve are left out of the series (see the empty-name case)."""
    labels: Path = tmp_path_factory.mktemp("labels") / "labels.yaml"
    labels.write_text("myLabel: \"'user ' + descriptors[1].foobar\"\n")
    with serving("memory", LIMITS, request, tmp_path_factory, "-l", "-L", str(labels)) as service:
        yield service


def samples(service: ServiceProcess, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of the family `name` (the parser names a counter's samples `<name>_total`
    whatever the text said; the exact text is asserted separately)."""
    response = service.http.get("/metrics")
    response.raise_for_status()
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(response.text)
        if family.name == name
        for sample in family.samples
    ]


def value(service: ServiceProcess, name: str, **labels: str) -> float | None:
    """The sample of `name` whose labels include `labels` (None when there is none)."""
    found = [v for sample_labels, v in samples(service, name) if labels.items() <= sample_labels.items()]
    assert len(found) <= 1, found
    return found[0] if found else None


def call(api: Api, namespace: str, values: dict[str, str], times: int, expect: int, hits: int = 1) -> None:
    """`times` check_and_report calls of `hits` each, every one answered `expect`."""
    for _ in range(times):
        assert api.check_and_report(namespace, values, hits) == expect


def test_shows_authorized_calls_by_namespace(service: ServiceProcess) -> None:
    """`shows_authorized_calls_by_namespace`, prometheus_metrics.rs: 2 and 3 calls."""
    api = Api(service)
    for namespace, calls in (("auth_calls_by_namespace", 2), ("auth_calls_by_namespace_two", 3)):
        call(api, namespace, {}, calls, expect=200)
    assert value(service, "authorized_calls", limitador_namespace="auth_calls_by_namespace") == 2
    assert value(service, "authorized_calls", limitador_namespace="auth_calls_by_namespace_two") == 3
    # Limitador's exact text: no `_total`, the namespace label.
    assert 'authorized_calls{limitador_namespace="auth_calls_by_namespace"} 2' in service.http.get("/metrics").text


def test_shows_authorized_hits_by_namespace(service: ServiceProcess) -> None:
    """`shows_authorized_hits_by_namespace`, prometheus_metrics.rs: 2 calls of 7 and 3 of 8 hits
    are 14 and 24 hits (on top of the calls of the test above, which count 1 hit each)."""
    api = Api(service)
    before = {
        namespace: value(service, "authorized_hits", limitador_namespace=namespace) or 0
        for namespace in ("auth_calls_by_namespace", "auth_calls_by_namespace_two")
    }
    for namespace, calls, hits in (("auth_calls_by_namespace", 2, 7), ("auth_calls_by_namespace_two", 3, 8)):
        call(api, namespace, {}, calls, expect=200, hits=hits)
    assert value(service, "authorized_hits", limitador_namespace="auth_calls_by_namespace") == before[
        "auth_calls_by_namespace"] + 14
    assert value(service, "authorized_hits", limitador_namespace="auth_calls_by_namespace_two") == before[
        "auth_calls_by_namespace_two"] + 24


def test_shows_limited_calls_by_namespace(service: ServiceProcess) -> None:
    """`shows_limited_calls_by_namespace`, prometheus_metrics.rs: 2 and 3 refused calls."""
    api = Api(service)
    for namespace, calls in (("limited_calls_by_namespace", 2), ("limited_calls_by_namespace_two", 3)):
        call(api, namespace, {}, calls, expect=429)
    assert value(service, "limited_calls", limitador_namespace="limited_calls_by_namespace") == 2
    assert value(service, "limited_calls", limitador_namespace="limited_calls_by_namespace_two") == 3
    assert value(service, "authorized_calls", limitador_namespace="limited_calls_by_namespace") in (None, 0)


def test_can_show_limited_calls_by_limit_name(service: ServiceProcess) -> None:
    """`can_show_limited_calls_by_limit_name`, prometheus_metrics.rs: with `-l`, 2 calls refused
    by "Some limit" and 3 by "Another limit", one namespace."""
    api = Api(service)
    for which, calls in (("some", 2), ("another", 3)):
        call(api, "limited_calls_by_limit_name", {"which": which}, calls, expect=429)
    namespace = "limited_calls_by_limit_name"
    assert value(service, "limited_calls", limitador_namespace=namespace, limit_name="Some limit") == 2
    assert value(service, "limited_calls", limitador_namespace=namespace, limit_name="Another limit") == 3


def test_incr_limited_calls_uses_empty_string_when_no_name(service: ServiceProcess) -> None:
    """`incr_limited_calls_uses_empty_string_when_no_name`, prometheus_metrics.rs: with `-l`, a
    call refused by an unnamed limit is counted with an empty `limit_name`. Limitador prints
    `limit_name=""`; we leave the empty label out, which Prometheus reads as the same series
    (`{limit_name=""}` selects it either way; README.md lists the difference)."""
    assert Api(service).check_and_report("limited_calls_empty_name", {}) == 429
    [(labels, count)] = [
        (labels, count) for labels, count in samples(service, "limited_calls")
        if labels.get("limitador_namespace") == "limited_calls_empty_name"
    ]
    assert (labels.get("limit_name", ""), count) == ("", 1)


def test_incr_limited_calls_uses_custom_labels(service: ServiceProcess) -> None:
    """`incr_limited_calls_uses_custom_labels`, prometheus_metrics.rs: the `-L` label
    `myLabel: 'user ' + descriptors[1].foobar` over a request whose second descriptor has
    `foobar: 1` labels the limited call `myLabel="user 1"`. Two descriptors need the RLS: the
    first one is empty, as in Limitador's case."""
    stub = rls_pb2_grpc.RateLimitServiceStub(service.grpc)
    request = RateLimitRequest(domain="limited_calls_custom_labels", descriptors=[
        RateLimitDescriptor(), RateLimitDescriptor(entries=[RateLimitDescriptor.Entry(key="foobar", value="1")]),
    ])
    assert stub.ShouldRateLimit(request).overall_code == RateLimitResponse.OVER_LIMIT
    assert value(service, "limited_calls", limitador_namespace="limited_calls_custom_labels",
                 myLabel="user 1") == 1
    assert 'myLabel="user 1"' in service.http.get("/metrics").text


def test_shows_limitador_up_set_to_1(service: ServiceProcess) -> None:
    """`shows_limitador_up_set_to_1`, prometheus_metrics.rs."""
    assert "limitador_up 1" in service.http.get("/metrics").text
    assert samples(service, "limitador_up") == [({}, 1.0)]
