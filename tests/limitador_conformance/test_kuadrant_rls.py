"""Limitador server's Kuadrant RLS tests (`limitador-server/src/envoy_rls/kuadrant_service.rs`,
`mod tests::{check_rate_limit, report}`), black-box: a real gRPC client calls
`kuadrant.service.ratelimit.v1.RateLimitService` (CheckRateLimit, Report) on `ratelimit serve`,
memory storage, one namespace (RLS domain) per case. What a call did to the counters is read
back from `GET /counters`, which Limitador's in-process tests cannot see.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest, RateLimitResponse

from ratelimit.proto import kuadrantrls_pb2_grpc
from tests.limitador_conformance.harness import REQ_APP_ID, Api, app_limit, limit, serving
from tests.service_fixtures import ServiceProcess

OK, OVER_LIMIT, UNKNOWN = RateLimitResponse.OK, RateLimitResponse.OVER_LIMIT, RateLimitResponse.UNKNOWN
GET_APP_1 = {"req.method": "GET", "app.id": "1"}


LIMITS = [
    app_limit("check_test_returns_ok_correctly", 1),
    app_limit("check_test_returns_overlimit_correctly", 0),
    limit("check_test_takes_into_account_all_the_descriptors", 10,
          conditions=("descriptors[0].x == '1'",), variables=("descriptors[0].z",)),
    limit("check_test_takes_into_account_all_the_descriptors", 0,
          conditions=("descriptors[0].x == '1'", "descriptors[1].y == '2'"), variables=("descriptors[0].z",)),
    app_limit("report_test_returns_ok_correctly", 10),
    app_limit("report_test_going_overlimit_is_ok", 5),
]


@pytest.fixture(scope="module")
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with serving("memory", LIMITS, request, tmp_path_factory) as service:
        yield service


@pytest.fixture
def stub(service: ServiceProcess) -> kuadrantrls_pb2_grpc.RateLimitServiceStub:
    return kuadrantrls_pb2_grpc.RateLimitServiceStub(service.grpc)


def descriptor(entries: dict[str, str]) -> RateLimitDescriptor:
    return RateLimitDescriptor(entries=[RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()])


def rls_request(domain: str, *descriptors: dict[str, str], hits_addend: int = 1) -> RateLimitRequest:
    return RateLimitRequest(domain=domain, descriptors=[descriptor(d) for d in descriptors], hits_addend=hits_addend)


def remaining_of_app_1(api: Api, namespace: str) -> dict[str, int]:
    return api.remaining_by(namespace, REQ_APP_ID)


# -- CheckRateLimit --------------------------------------------------------------------------------


def test_check_rate_limit_returns_ok_correctly(stub: kuadrantrls_pb2_grpc.RateLimitServiceStub, api: Api) -> None:
    """`check_rate_limit::test_returns_ok_correctly`, kuadrant_service.rs: a limit of 1 answers OK
    to two checks: CheckRateLimit charges nothing."""
    request = rls_request("check_test_returns_ok_correctly", GET_APP_1)
    assert [stub.CheckRateLimit(request).overall_code for _ in range(2)] == [OK, OK]
    assert api.counters("check_test_returns_ok_correctly") == []


def test_check_rate_limit_returns_overlimit_correctly(stub: kuadrantrls_pb2_grpc.RateLimitServiceStub) -> None:
    """`check_rate_limit::test_returns_overlimit_correctly`, kuadrant_service.rs: a limit of 0."""
    response = stub.CheckRateLimit(rls_request("check_test_returns_overlimit_correctly", GET_APP_1))
    assert response.overall_code == OVER_LIMIT


def test_check_rate_limit_returns_ok_when_no_limits_apply(stub: kuadrantrls_pb2_grpc.RateLimitServiceStub) -> None:
    """`check_rate_limit::test_returns_ok_when_no_limits_apply`, kuadrant_service.rs."""
    assert stub.CheckRateLimit(rls_request("test_namespace", {"req.method": "GET"})).overall_code == OK


def test_check_rate_limit_returns_unknown_when_domain_is_empty(stub: kuadrantrls_pb2_grpc.RateLimitServiceStub) -> None:
    """`check_rate_limit::test_returns_unknown_when_domain_is_empty`, kuadrant_service.rs."""
    assert stub.CheckRateLimit(rls_request("", {"req.method": "GET"})).overall_code == UNKNOWN


def test_check_rate_limit_takes_into_account_all_the_descriptors(
    stub: kuadrantrls_pb2_grpc.RateLimitServiceStub,
) -> None:
    """`check_rate_limit::test_takes_into_account_all_the_descriptors`, kuadrant_service.rs: the
    second descriptor makes the limit of 0 apply."""
    request = rls_request("check_test_takes_into_account_all_the_descriptors", {"x": "1", "z": "1"}, {"y": "2"})
    assert stub.CheckRateLimit(request).overall_code == OVER_LIMIT
    alone = rls_request("check_test_takes_into_account_all_the_descriptors", {"x": "1", "z": "1"})
    assert stub.CheckRateLimit(alone).overall_code == OK


# -- Report ----------------------------------------------------------------------------------------


def test_report_returns_ok_correctly(stub: kuadrantrls_pb2_grpc.RateLimitServiceStub, api: Api) -> None:
    """`report::test_returns_ok_correctly`, kuadrant_service.rs: Report of 4 on a limit of 10 is
    OK, and charges 4."""
    response = stub.Report(rls_request("report_test_returns_ok_correctly", GET_APP_1, hits_addend=4))
    assert response.overall_code == OK
    assert remaining_of_app_1(api, "report_test_returns_ok_correctly") == {"1": 6}


def test_report_going_overlimit_is_ok(stub: kuadrantrls_pb2_grpc.RateLimitServiceStub, api: Api) -> None:
    """`report::test_going_overlimit_is_ok`, kuadrant_service.rs: Report of 20 on a limit of 5 is
    OK (usage already happened). The counter then shows 0 remaining and the overshoot of 15;
    Limitador's `remaining` would wrap (README.md: clamped `remaining`)."""
    response = stub.Report(rls_request("report_test_going_overlimit_is_ok", GET_APP_1, hits_addend=20))
    assert response.overall_code == OK
    [counter] = api.counters("report_test_going_overlimit_is_ok")
    assert (counter["remaining"], counter["overshoot"]) == (0, 15)
    assert stub.CheckRateLimit(rls_request("report_test_going_overlimit_is_ok", GET_APP_1)).overall_code == OVER_LIMIT


def test_report_returns_ok_when_no_limits_apply(stub: kuadrantrls_pb2_grpc.RateLimitServiceStub) -> None:
    """`report::test_returns_ok_when_no_limits_apply`, kuadrant_service.rs."""
    assert stub.Report(rls_request("test_namespace", {"req.method": "GET"})).overall_code == OK


def test_report_returns_unknown_when_domain_is_empty(stub: kuadrantrls_pb2_grpc.RateLimitServiceStub) -> None:
    """`report::test_returns_unknown_when_domain_is_empty`, kuadrant_service.rs."""
    assert stub.Report(rls_request("", {"req.method": "GET"})).overall_code == UNKNOWN
