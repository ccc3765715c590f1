"""The gRPC services of the real `ratelimit serve` process: Envoy RLS v3 (ShouldRateLimit), Kuadrant
RLS v1 (CheckRateLimit, Report, Reserve, Commit), health and reflection, and bad input."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest, RateLimitResponse
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratelimit.proto import generate, kuadrantrls_pb2_grpc
from ratelimit.proto.kuadrantrls_pb2 import CommitRequest, ReserveRequest
from tests.service_fixtures import ServiceProcess

OK, OVER_LIMIT, UNKNOWN = RateLimitResponse.OK, RateLimitResponse.OVER_LIMIT, RateLimitResponse.UNKNOWN
Unit = RateLimitResponse.RateLimit
ENVOY_METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1

LIMITS = """
- {namespace: requests, name: per-user, max_value: 3, seconds: 60, variables: ["descriptors[0]['user_id']"]}
- {namespace: tokens, name: tokens, max_value: 100, seconds: 300, variables: ["descriptors[0]['user_id']"]}
- {namespace: stacked, name: burst, max_value: 5, seconds: 60, variables: ["descriptors[0]['user_id']"]}
- {namespace: stacked, max_value: 10, seconds: 3600, variables: ["descriptors[0]['user_id']"]}
# Limitador binds all descriptors of a request at once: descriptors[1] is the request's second one.
- namespace: pair
  max_value: 1
  seconds: 60
  conditions: ["descriptors[0]['x'] == '1'", "descriptors[1]['y'] == '2'"]
  variables: ["descriptors[0]['user_id']"]
# A gateway counting requests and tokens with one call: one descriptor per rate_limits entry.
- namespace: gateway
  name: requests
  max_value: 2
  seconds: 60
  conditions: ["descriptors[0]['kind'] == 'request'"]
  variables: ["descriptors[0]['user_id']"]
- namespace: gateway
  name: tokens
  max_value: 100
  seconds: 60
  conditions: ["descriptors[0]['kind'] == 'tokens'"]
  variables: ["descriptors[0]['user_id']"]
- {namespace: metered, max_value: 2, seconds: 60, variables: ["descriptors[0]['user_id']"]}
- {namespace: metered-kuadrant, max_value: 2, seconds: 60, variables: ["descriptors[0]['user_id']"]}
"""


@pytest.fixture(scope="module")
def limits_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grpc") / "limits.yaml"
    path.write_text(LIMITS)
    return path


@pytest.fixture(scope="module")
def service(limits_file: Path) -> Iterator[ServiceProcess]:
    """One service for the module (tests use their own users): `ratelimit serve` with reflection."""
    process = ServiceProcess(limits_file, "--grpc-reflection-service")
    try:
        yield process.start()
    finally:
        process.close()


def envoy_stub(service: ServiceProcess) -> rls_pb2_grpc.RateLimitServiceStub:
    return rls_pb2_grpc.RateLimitServiceStub(service.grpc)


def kuadrant_stub(service: ServiceProcess) -> kuadrantrls_pb2_grpc.RateLimitServiceStub:
    return kuadrantrls_pb2_grpc.RateLimitServiceStub(service.grpc)


def descriptor(hits_addend: int | None = None, /, **entries: str) -> RateLimitDescriptor:
    message = RateLimitDescriptor(entries=[RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()])
    if hits_addend is not None:
        message.hits_addend.value = hits_addend
    return message


def request(domain: str, *descriptors: RateLimitDescriptor, hits_addend: int = 0) -> RateLimitRequest:
    return RateLimitRequest(domain=domain, descriptors=descriptors, hits_addend=hits_addend)


def counter(service: ServiceProcess, namespace: str, user: str) -> dict:
    [found] = [c for c in service.http.get(f"/counters/{namespace}").json()
               if c["set_variables"] == {"descriptors[0]['user_id']": user}]
    return found


def codes(responses: Sequence[RateLimitResponse]) -> list[int]:
    return [response.overall_code for response in responses]


def error_of(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


# -- Envoy RLS v3 ---------------------------------------------------------------------------------


def test_should_rate_limit_counts_requests_per_user(service: ServiceProcess) -> None:
    stub = envoy_stub(service)
    alice = [stub.ShouldRateLimit(request("requests", descriptor(user_id="rls-alice"))) for _ in range(4)]
    assert codes(alice) == [OK, OK, OK, OVER_LIMIT]
    statuses = [response.statuses[0] for response in alice]
    assert [status.code for status in statuses] == [OK, OK, OK, OVER_LIMIT]
    assert [status.limit_remaining for status in statuses] == [2, 1, 0, 0]
    limit = statuses[0].current_limit
    assert (limit.requests_per_unit, limit.unit, limit.name) == (3, Unit.MINUTE, "per-user")
    assert 0 < statuses[-1].duration_until_reset.seconds <= 60
    assert not alice[0].response_headers_to_add  # without -H DRAFT_VERSION_03

    bob = stub.ShouldRateLimit(request("requests", descriptor(user_id="rls-bob")))
    assert (bob.overall_code, bob.statuses[0].limit_remaining) == (OK, 2)


def test_empty_domain_is_unknown_and_charges_nothing(service: ServiceProcess) -> None:
    response = envoy_stub(service).ShouldRateLimit(request("", descriptor(user_id="nobody")))
    assert (response.overall_code, list(response.statuses)) == (UNKNOWN, [])


def test_request_hits_addend_is_checked_and_charged_atomically(service: ServiceProcess) -> None:
    stub = envoy_stub(service)
    user = descriptor(user_id="rls-hits")
    answers = [stub.ShouldRateLimit(request("requests", user, hits_addend=hits)) for hits in (0, 1, 2, 1)]
    # 0 counts as 1; 2 would pass the limit of 3 and is refused charging nothing, so 1 still fits.
    assert codes(answers) == [OK, OK, OVER_LIMIT, OK]
    assert counter(service, "requests", "rls-hits")["remaining"] == 0
    # The largest request-level hits_addend (uint32) is refused like any other too-large amount.
    huge = stub.ShouldRateLimit(request("requests", descriptor(user_id="rls-huge"), hits_addend=UINT32_MAX))
    assert (huge.overall_code, huge.statuses[0].limit_remaining) == (OVER_LIMIT, 3)


def test_token_pattern_checks_with_zero_and_charges_what_was_used(service: ServiceProcess) -> None:
    """Envoy's token pattern: hits_addend 0 on the request path, the used tokens on stream done."""
    stub = envoy_stub(service)
    checks, charges = [], []
    for _ in range(4):
        checks.append(stub.ShouldRateLimit(request("tokens", descriptor(0, user_id="rls-tokens"))))
        if checks[-1].overall_code == OK:
            charges.append(stub.ShouldRateLimit(request("tokens", descriptor(40, user_id="rls-tokens"))))
    assert codes(checks) == [OK, OK, OK, OVER_LIMIT]
    # The third charge passes the budget: it sticks (the tokens were spent) and says OVER_LIMIT.
    assert codes(charges) == [OK, OK, OVER_LIMIT]
    assert [response.statuses[0].limit_remaining for response in checks] == [100, 60, 20, 0]
    status = checks[-1].statuses[0]
    # 300 s is no Envoy unit: UNKNOWN keeps Envoy from stating a false window; the rest is exact.
    assert (status.current_limit.requests_per_unit, status.current_limit.unit) == (100, Unit.UNKNOWN)
    assert 0 < status.duration_until_reset.seconds <= 300
    found = counter(service, "tokens", "rls-tokens")
    assert (found["remaining"], found["overshoot"]) == (0, 20)


def test_descriptors_with_different_hits_addend_are_decided_in_groups(service: ServiceProcess) -> None:
    """[request count (request's hits_addend), token check (own 0)]: the token budget is checked,
    then the request is counted; a spent budget refuses the request without counting it."""
    stub = envoy_stub(service)
    counted = descriptor(kind="request", user_id="rls-mixed")
    tokens_left = descriptor(0, kind="tokens", user_id="rls-mixed")
    first = stub.ShouldRateLimit(request("gateway", counted, tokens_left))
    assert first.overall_code == OK
    assert [(s.current_limit.name, s.limit_remaining) for s in first.statuses] == [("requests", 1), ("tokens", 100)]

    used = stub.ShouldRateLimit(request("gateway", descriptor(120, kind="tokens", user_id="rls-mixed")))
    assert used.overall_code == OVER_LIMIT  # charged past the budget

    refused = stub.ShouldRateLimit(request("gateway", counted, tokens_left))
    assert refused.overall_code == OVER_LIMIT
    # The token check refused: the request count was not decided, so not charged either.
    assert [status.code for status in refused.statuses] == [UNKNOWN, OVER_LIMIT]
    [requests] = [c for c in service.http.get("/counters/gateway").json() if c["limit"]["name"] == "requests"]
    assert requests["remaining"] == 1


def test_a_bad_descriptor_refuses_the_whole_request_before_anything_is_charged(service: ServiceProcess) -> None:
    stub = envoy_stub(service)
    counted = descriptor(user_id="rls-partial")
    bad_charge = descriptor(40, **{"k" * 300: "v"})
    error = error_of(lambda: stub.ShouldRateLimit(request("requests", counted, bad_charge)))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "descriptors[1]: key must be 1 to 256 characters, got 300"
    )
    assert stub.ShouldRateLimit(request("requests", counted)).statuses[0].limit_remaining == 2  # the first charge


def test_all_descriptors_of_a_request_are_bound_together(service: ServiceProcess) -> None:
    stub = envoy_stub(service)
    both = request("pair", descriptor(x="1", user_id="rls-pair"), descriptor(y="2"))
    assert codes([stub.ShouldRateLimit(both) for _ in range(2)]) == [OK, OVER_LIMIT]
    assert stub.ShouldRateLimit(request("pair", descriptor(x="1", user_id="rls-pair"))).overall_code == OK


def test_metrics_count_like_limitador(service: ServiceProcess) -> None:
    stub = envoy_stub(service)
    for _ in range(3):
        stub.ShouldRateLimit(request("metered", descriptor(user_id="rls-metered")))
    stub.ShouldRateLimit(request("metered", descriptor(2, user_id="rls-other")))  # usage only: hits, no call
    kuadrant = kuadrant_stub(service)
    kuadrant.CheckRateLimit(request("metered-kuadrant", descriptor(user_id="k-metered")))
    kuadrant.Report(request("metered-kuadrant", descriptor(user_id="k-metered"), hits_addend=3))
    kuadrant.Report(request("metered-kuadrant", descriptor(user_id="k-metered")))
    kuadrant.CheckRateLimit(request("metered-kuadrant", descriptor(user_id="k-metered")))
    text = service.http.get("/metrics").text

    def sample(name: str, namespace: str) -> int:
        match = re.search(rf'^{name}{{limitador_namespace="{namespace}"}} (\d+)$', text, re.MULTILINE)
        return int(match[1]) if match else 0

    assert [sample(n, "metered") for n in ("authorized_calls", "authorized_hits", "limited_calls")] == [2, 4, 1]
    assert [sample(n, "metered-kuadrant") for n in ("authorized_calls", "authorized_hits", "limited_calls")] == [1, 4, 1]


def test_limitador_headers_with_rate_limit_headers_flag(
    start_service: Callable[..., ServiceProcess], limits_file: Path
) -> None:
    service = start_service(limits_file, "-H", "DRAFT_VERSION_03")
    stub = envoy_stub(service)
    responses = [stub.ShouldRateLimit(request("stacked", descriptor(user_id="headers"))) for _ in range(6)]
    assert codes(responses) == [OK] * 5 + [OVER_LIMIT]
    headers = [(header.key, header.value) for header in responses[1].response_headers_to_add]
    assert headers == [
        ("X-RateLimit-Limit", '5, 5;w=60;name="burst", 10;w=3600'),
        ("X-RateLimit-Remaining", "3"),
        ("X-RateLimit-Reset", "60"),
    ]
    # Envoy's statuses name the tightest of the stacked windows.
    status = responses[1].statuses[0]
    assert (status.current_limit.name, status.current_limit.unit, status.limit_remaining) == ("burst", Unit.MINUTE, 3)
    # Reflection is off without --grpc-reflection-service.
    reflection = reflection_pb2_grpc.ServerReflectionStub(service.grpc)
    error = error_of(lambda: list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]))))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


def test_storage_failure_answers_unavailable(start_service: Callable[..., ServiceProcess], limits_file: Path) -> None:
    service = start_service(limits_file, "memory", "-c", "1")  # room for a single counter
    stub = envoy_stub(service)
    assert stub.ShouldRateLimit(request("requests", descriptor(user_id="first"))).overall_code == OK
    error = error_of(lambda: stub.ShouldRateLimit(request("requests", descriptor(user_id="second"))))
    # UNAVAILABLE, not an answer: Envoy then applies failure_mode_deny.
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "counter storage unavailable" in error.details()
    report = request("requests", descriptor(user_id="second"))
    assert error_of(lambda: kuadrant_stub(service).Report(report)).code() == grpc.StatusCode.UNAVAILABLE
    assert stub.ShouldRateLimit(request("requests", descriptor(user_id="first"))).overall_code == OK


# -- Kuadrant RLS v1 ------------------------------------------------------------------------------


def test_check_rate_limit_is_read_only_and_report_charges(service: ServiceProcess) -> None:
    stub = kuadrant_stub(service)
    alice = descriptor(user_id="k-alice")
    assert codes([stub.CheckRateLimit(request("tokens", alice)) for _ in range(5)]) == [OK] * 5
    assert stub.CheckRateLimit(request("tokens", alice, hits_addend=101)).overall_code == OVER_LIMIT
    assert stub.CheckRateLimit(request("tokens", alice, hits_addend=100)).overall_code == OK

    reported = stub.Report(request("tokens", alice, hits_addend=150))
    assert reported.overall_code == OK  # usage is recorded, even past the limit
    assert reported.statuses[0].limit_remaining == 0
    assert stub.CheckRateLimit(request("tokens", alice)).overall_code == OVER_LIMIT
    assert counter(service, "tokens", "k-alice")["overshoot"] == 50
    assert stub.CheckRateLimit(request("", alice)).overall_code == UNKNOWN


def test_reserve_holds_budget_until_commit(service: ServiceProcess) -> None:
    stub = kuadrant_stub(service)
    user = [descriptor(user_id="k-reserve")]
    ttl = Duration(seconds=30)
    first = stub.Reserve(ReserveRequest(domain="tokens", descriptors=user, amount=60, ttl=ttl))
    assert first.code == OK and first.reservation_id
    assert stub.Reserve(ReserveRequest(domain="tokens", descriptors=user, amount=60, ttl=ttl)).code == OVER_LIMIT

    committed = stub.Commit(CommitRequest(domain="tokens", descriptors=user, reservation_id=first.reservation_id,
                                          actual_amount=30))
    assert committed.reservation_released
    second = stub.Reserve(ReserveRequest(domain="tokens", descriptors=user, amount=60, ttl=ttl))
    assert second.code == OK  # 30 used + 60 held fit in 100
    unknown = stub.Commit(CommitRequest(domain="tokens", descriptors=user, reservation_id="nope", actual_amount=10))
    assert not unknown.reservation_released  # charged all the same
    found = counter(service, "tokens", "k-reserve")
    assert (found["reserved"], found["remaining"]) == (60, 0)
    assert stub.Reserve(ReserveRequest(domain="", descriptors=user, amount=1, ttl=ttl)).code == UNKNOWN


# -- bad input ------------------------------------------------------------------------------------

BAD_REQUESTS = {
    "too many descriptors": (
        "ShouldRateLimit", request("requests", *[descriptor(user_id="x")] * 5000),
        "descriptors: 5000 descriptors, at most 64 allowed",
    ),
    "huge key": (
        "ShouldRateLimit", request("requests", descriptor(**{"k" * 300: "v"})),
        "descriptors[0]: key must be 1 to 256 characters, got 300",
    ),
    "huge value, named by its position in the request": (
        "ShouldRateLimit", request("requests", descriptor(0, user_id="ok"), descriptor(user_id="v" * 5000)),
        "descriptors[1]['user_id']: value is 5000 characters, at most 4096",
    ),
    "hits_addend at the uint64 maximum": (
        "ShouldRateLimit", request("requests", descriptor(UINT64_MAX, user_id="x")),
        f"descriptors[0].hits_addend: must be at most {UINT32_MAX}, got {UINT64_MAX}",
    ),
    "huge domain": (
        "ShouldRateLimit", request("d" * 5000, descriptor(user_id="x")), "domain: is 5000 characters, at most 4096",
    ),
    "per-descriptor hits_addend on Kuadrant": (
        "CheckRateLimit", request("tokens", descriptor(0, user_id="x")),
        "descriptors[0].hits_addend: not used by the Kuadrant service; set the request's hits_addend",
    ),
    "reserve without ttl": (
        "Reserve", ReserveRequest(domain="tokens", descriptors=[descriptor(user_id="x")], amount=1),
        "ttl: must be more than 0 and at most 86400 seconds",
    ),
    "reserve at the uint64 maximum": (
        "Reserve", ReserveRequest(domain="tokens", amount=UINT64_MAX, ttl=Duration(seconds=1)),
        f"amount: must be at most {UINT32_MAX}, got {UINT64_MAX}",
    ),
    "commit without reservation id": (
        "Commit", CommitRequest(domain="tokens", actual_amount=1), "reservation_id: must be a non-empty id from reserve",
    ),
    "commit without domain": (
        "Commit", CommitRequest(reservation_id="r", actual_amount=1),
        "domain: must name the namespace the reservation was made in",
    ),
}


@pytest.mark.parametrize("method, message, details", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_is_invalid_argument_naming_the_field(
    service: ServiceProcess, method: str, message: object, details: str
) -> None:
    stub = envoy_stub(service) if method == "ShouldRateLimit" else kuadrant_stub(service)
    error = error_of(lambda: getattr(stub, method)(message))
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)


def test_invalid_utf8_and_oversized_messages_get_clear_statuses(service: ServiceProcess) -> None:
    raw = service.grpc.unary_unary(ENVOY_METHOD)
    # Field 1 (domain), 2 bytes that are not UTF-8: protobuf refuses to decode the request.
    error = error_of(lambda: raw(b"\x0a\x02\xff\xfe"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "String field had bad UTF-8" in error.details()
    oversized = request("requests", descriptor(user_id="v" * (5 * 2**20)))
    assert error_of(lambda: envoy_stub(service).ShouldRateLimit(oversized)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


ANSWERED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
texts = st.one_of(st.text(max_size=20), st.text(min_size=4000, max_size=5000), st.sampled_from(["user_id", ""]))
descriptors = st.builds(
    lambda entries, hits: descriptor(hits, **entries),
    st.dictionaries(texts, texts, max_size=70),
    st.one_of(st.none(), st.integers(0, 100), st.just(UINT32_MAX), st.just(UINT32_MAX + 1), st.just(UINT64_MAX)),
)
thousands = st.builds(lambda n: [descriptor(user_id="many")] * n, st.sampled_from([65, 2000, 5000]))
requests = st.builds(
    lambda domain, items, hits: request(domain, *items, hits_addend=hits),
    st.one_of(st.sampled_from(["requests", "tokens", "gateway", ""]), texts),
    st.one_of(st.lists(descriptors, max_size=4), thousands),
    st.one_of(st.integers(0, 10), st.just(UINT32_MAX)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(message=requests, raw=st.binary(max_size=200))
def test_hypothesis_bad_requests_get_clear_statuses_and_the_server_stays_up(
    service: ServiceProcess, message: RateLimitRequest, raw: bytes
) -> None:
    stub = envoy_stub(service)
    try:
        response = stub.ShouldRateLimit(message, timeout=10)
    except grpc.RpcError as error:
        assert error.code() in ANSWERED, error.details()
        assert error.details()
    else:
        assert response.overall_code in (OK, OVER_LIMIT, UNKNOWN)
        assert len(response.statuses) == (len(message.descriptors) if message.domain else 0)
    try:
        kuadrant_stub(service).Report(message, timeout=10)
    except grpc.RpcError as error:
        assert error.code() in ANSWERED, error.details()
    try:
        service.grpc.unary_unary(ENVOY_METHOD)(raw, timeout=10)
    except grpc.RpcError as error:
        assert error.code() in ANSWERED, error.details()
    assert health(service) == health_pb2.HealthCheckResponse.SERVING


# -- the server -----------------------------------------------------------------------------------


def health(service: ServiceProcess, name: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(service.grpc)
    return stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status


def test_health_and_reflection(service: ServiceProcess) -> None:
    names = ["envoy.service.ratelimit.v3.RateLimitService", "kuadrant.service.ratelimit.v1.RateLimitService"]
    assert [health(service, name) for name in ["", *names]] == [health_pb2.HealthCheckResponse.SERVING] * 3
    stub = reflection_pb2_grpc.ServerReflectionStub(service.grpc)
    [answer] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    listed = {entry.name for entry in answer.list_services_response.service}
    assert set(names) <= listed


def test_taken_grpc_port_fails_the_start(
    service: ServiceProcess, limits_file: Path, start_service: Callable[..., ServiceProcess]
) -> None:
    with pytest.raises(RuntimeError, match=rf"gRPC could not start on 127\.0\.0\.1:{service.rls_port}"):
        start_service(limits_file, "-p", str(service.rls_port))


def test_generated_kuadrant_modules_are_up_to_date(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    for name in ("kuadrantrls_pb2.py", "kuadrantrls_pb2.pyi", "kuadrantrls_pb2_grpc.py"):
        fresh = (tmp_path / "ratelimit" / "proto" / name).read_text()
        assert fresh == (generate.ROOT / "ratelimit" / "proto" / name).read_text(), "run `make -C ratelimit/proto`"
