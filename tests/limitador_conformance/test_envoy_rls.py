"""Limitador server's Envoy RLS tests (`limitador-server/src/envoy_rls/server.rs`, `mod tests`),
black-box: a real gRPC client calls `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`
on `ratelimit serve -H DRAFT_VERSION_03` (Limitador's tests build the service with
`RateLimitHeaders::DraftVersion03`), memory storage, one namespace (RLS domain) per case.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest, RateLimitResponse

from tests.limitador_conformance.harness import Api, limit, serving
from tests.service_fixtures import ServiceProcess

OK, OVER_LIMIT, UNKNOWN = RateLimitResponse.OK, RateLimitResponse.OVER_LIMIT, RateLimitResponse.UNKNOWN

LIMITS = [
    limit("test_returns_ok_and_overlimit_correctly", 1,
          conditions=("descriptors[0]['req.method'] == 'GET'",), variables=("descriptors[0]['app.id']",)),
    limit("test_takes_into_account_all_the_descriptors", 10,
          conditions=("descriptors[0].x == '1'",), variables=("descriptors[0].z",)),
    limit("test_takes_into_account_all_the_descriptors", 0,
          conditions=("descriptors[0].x == '1'", "descriptors[1].y == '2'"), variables=("descriptors[0].z",)),
    limit("test_takes_into_account_the_hits_addend_param", 10,
          conditions=("descriptors[0].x == '1'",), variables=("descriptors[0].y",)),
    limit("test_0_hits_addend_is_converted_to_1", 1,
          conditions=("descriptors[0].x == '1'",), variables=("descriptors[0].y",)),
]


@pytest.fixture(scope="module")
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with serving("memory", LIMITS, request, tmp_path_factory, "-H", "DRAFT_VERSION_03") as service:
        yield service


@pytest.fixture
def stub(service: ServiceProcess) -> rls_pb2_grpc.RateLimitServiceStub:
    return rls_pb2_grpc.RateLimitServiceStub(service.grpc)


def descriptor(**entries: str) -> RateLimitDescriptor:
    return RateLimitDescriptor(entries=[RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()])


def rls_request(domain: str, *descriptors: RateLimitDescriptor, hits_addend: int = 1) -> RateLimitRequest:
    return RateLimitRequest(domain=domain, descriptors=descriptors, hits_addend=hits_addend)


def headers(response: RateLimitResponse) -> dict[str, str]:
    """The Limitador-format headers of an answer; exactly three (Limit, Remaining, Reset)."""
    found = {header.key: header.value for header in response.response_headers_to_add}
    assert len(response.response_headers_to_add) == 3 == len(found), response.response_headers_to_add
    assert 0 <= int(found.pop("X-RateLimit-Reset")) <= 60
    return found


def test_returns_ok_and_overlimit_correctly(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    """`test_returns_ok_and_overlimit_correctly`, envoy_rls/server.rs: a limit of 1; OK then
    OVER_LIMIT, both with `X-RateLimit-Limit: 1, 1;w=60` and remaining 0."""
    request = rls_request("test_returns_ok_and_overlimit_correctly", descriptor(**{"req.method": "GET", "app.id": "1"}))
    first, second = stub.ShouldRateLimit(request), stub.ShouldRateLimit(request)
    assert (first.overall_code, second.overall_code) == (OK, OVER_LIMIT)
    for response in (first, second):
        assert headers(response) == {"X-RateLimit-Limit": "1, 1;w=60", "X-RateLimit-Remaining": "0"}


def test_returns_ok_when_no_limits_apply(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    """`test_returns_ok_when_no_limits_apply`, envoy_rls/server.rs: OK, and no headers."""
    response = stub.ShouldRateLimit(rls_request("test_namespace", descriptor(**{"req.method": "GET"})))
    assert response.overall_code == OK
    assert list(response.response_headers_to_add) == []


def test_returns_unknown_when_domain_is_empty(stub: rls_pb2_grpc.RateLimitServiceStub, service: ServiceProcess) -> None:
    """`test_returns_unknown_when_domain_is_empty`, envoy_rls/server.rs: UNKNOWN, no headers, and
    nothing counted."""
    response = stub.ShouldRateLimit(rls_request("", descriptor(**{"req.method": "GET"})))
    assert response.overall_code == UNKNOWN
    assert list(response.response_headers_to_add) == []
    assert Api(service).counters("") == []


def test_takes_into_account_all_the_descriptors(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    """`test_takes_into_account_all_the_descriptors`, envoy_rls/server.rs: the second descriptor
    (`y: 2`) makes the limit of 0 apply, so the request is OVER_LIMIT; the headers list both
    windows, the tightest first."""
    response = stub.ShouldRateLimit(rls_request(
        "test_takes_into_account_all_the_descriptors", descriptor(x="1", z="1"), descriptor(y="2"),
    ))
    assert response.overall_code == OVER_LIMIT
    assert headers(response) == {"X-RateLimit-Limit": "0, 0;w=60, 10;w=60", "X-RateLimit-Remaining": "0"}


def test_takes_into_account_the_hits_addend_param(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    """`test_takes_into_account_the_hits_addend_param`, envoy_rls/server.rs: a limit of 10 and a
    hits_addend of 6: OK with 4 remaining, then OVER_LIMIT (6 more do not fit)."""
    request = rls_request("test_takes_into_account_the_hits_addend_param", descriptor(x="1", y="1"), hits_addend=6)
    first, second = stub.ShouldRateLimit(request), stub.ShouldRateLimit(request)
    assert (first.overall_code, second.overall_code) == (OK, OVER_LIMIT)
    assert headers(first) == {"X-RateLimit-Limit": "10, 10;w=60", "X-RateLimit-Remaining": "4"}
    # Limitador shows 0 here: its answer lists the counters as they would be after the refused
    # hits. Ours shows what is really left (nothing was charged); README.md lists the difference.
    assert headers(second) == {"X-RateLimit-Limit": "10, 10;w=60", "X-RateLimit-Remaining": "4"}


def test_0_hits_addend_is_converted_to_1(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    """`test_0_hits_addend_is_converted_to_1`, envoy_rls/server.rs: the request-level hits_addend
    defaults to 0 in protobuf and counts as 1: OK, then OVER_LIMIT on a limit of 1."""
    request = rls_request("test_0_hits_addend_is_converted_to_1", descriptor(x="1", y="2"), hits_addend=0)
    first, second = stub.ShouldRateLimit(request), stub.ShouldRateLimit(request)
    assert (first.overall_code, second.overall_code) == (OK, OVER_LIMIT)
    for response in (first, second):
        assert headers(response) == {"X-RateLimit-Limit": "1, 1;w=60", "X-RateLimit-Remaining": "0"}
