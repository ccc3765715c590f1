"""Limitador's library integration tests (`limitador/tests/integration_tests.rs`), black-box.

Limitador runs each of these cases over every storage it has (`test_with_all_storage_impls!`);
here each runs over the memory storage and Redis (`redis`, and the write-behind `redis_cached`,
which is Limitador's "async redis with local cache"), one service per storage for the module and
one namespace per case. The library calls map onto the HTTP API the Limitador server puts over
them: `is_rate_limited` is `POST /check`, `update_counters` is `POST /report`,
`check_rate_limited_and_update` is `POST /check_and_report`, `get_limits` / `get_counters` are
`GET /limits/{ns}` / `GET /counters/{ns}`, and `add_limit` is an entry of the limits file.
Cases that change limits at run time (`configure_with`, `delete_limit`) are in
`test_integration_reload.py`; cases with no black-box equivalent are listed in README.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.limitador_conformance.harness import APP_ID, GET, Api, limit, serving, start_on, storage_of
from tests.service_fixtures import ServiceProcess
from tests.support import wait_until

POST = {**GET, "req_method": "POST"}
METHOD_IS_POST = "descriptors[0]['req_method'] == 'POST'"

LIMITS: list[dict[str, Any]] = [
    limit("first_namespace", 10),
    limit("second_namespace", 20),
    limit("add_a_limit", 10),
    limit("add_limit_without_vars", 10, variables=()),
    limit("add_several_limits_in_the_same_namespace", 10, conditions=(METHOD_IS_POST,)),
    limit("add_several_limits_in_the_same_namespace", 5),
    limit("rate_limited", 3),
    limit("rate_limited_id_counter", 3, id="test-rate_limited_id_counter"),
    limit("multiple_limits_rate_limited", 3),
    limit("multiple_limits_rate_limited", 4, conditions=(METHOD_IS_POST,)),
    limit("rate_limited_with_delta_higher_than_one", 10),
    limit("rate_limited_with_delta_higher_than_max", 10),
    limit("takes_into_account_only_vars_of_the_limits", 3),
    limit("is_rate_limited_returns_false_when_no_matching_limits", 0),
    limit("is_rate_limited_applies_limit_if_its_unconditional", 0, conditions=()),
    limit("check_rate_limited_and_update", 3),
    limit("check_rate_limited_and_update_load_counters", 3),
    limit("check_rate_limited_and_update_returns_true_if_no_limits_apply", 10),
    limit("check_rate_limited_and_update_applies_limit_if_its_unconditional", 0, conditions=()),
    limit("get_counters", 10),
    limit("get_counters_returns_empty_when_no_counters_in_namespace", 10),
    limit("get_counters_does_not_return_expired_ones", 10, seconds=1),
    # Limitador's add_limit refuses a limit whose identity (namespace, seconds, conditions,
    # variables) is known already: a limits file listing it twice keeps the first.
    limit("add_limit_only_adds_if_not_present", 10),
    limit("add_limit_only_adds_if_not_present", 20),
    limit("add_limit_only_adds_if_not_present", 20, name="Name is irrelevant too"),
    limit("distributed_rate_limited", 3),
]


@pytest.fixture(scope="module", params=["memory", "redis", "redis_cached"])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    with serving(request.param, LIMITS, request, tmp_path_factory) as service:
        yield service


def served(entry: dict[str, Any]) -> dict[str, Any]:
    """The JSON `GET /limits` shows for a limits-file entry (Limitador's `Limit` shape)."""
    return {"id": None, "name": None, **entry}


def sorted_limits(limits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(limits, key=lambda entry: (entry["max_value"], entry["conditions"]))


# -- namespaces and limits -------------------------------------------------------------------------


def test_get_namespaces(api: Api) -> None:
    """`get_namespaces`, integration_tests.rs: both namespaces of the limits file are known.
    The server has no namespace listing; a namespace is known when `/limits/{ns}` lists limits."""
    assert [entry["max_value"] for entry in api.limits("first_namespace")] == [10]
    assert [entry["max_value"] for entry in api.limits("second_namespace")] == [20]


def test_get_namespaces_returns_empty_when_there_arent_any(api: Api) -> None:
    """`get_namespaces_returns_empty_when_there_arent_any`, integration_tests.rs."""
    assert api.limits("no_such_namespace") == []


def test_add_a_limit(api: Api) -> None:
    """`add_a_limit`, integration_tests.rs: the limit comes back exactly, in Limitador's shape."""
    assert api.limits("add_a_limit") == [served(limit("add_a_limit", 10))]


def test_add_limit_without_vars(api: Api) -> None:
    """`add_limit_without_vars`, integration_tests.rs."""
    assert api.limits("add_limit_without_vars") == [served(limit("add_limit_without_vars", 10, variables=()))]


def test_add_several_limits_in_the_same_namespace(api: Api) -> None:
    """`add_several_limits_in_the_same_namespace`, integration_tests.rs."""
    namespace = "add_several_limits_in_the_same_namespace"
    assert sorted_limits(api.limits(namespace)) == [
        served(limit(namespace, 5)),
        served(limit(namespace, 10, conditions=(METHOD_IS_POST,))),
    ]


def test_get_limits_returns_empty_if_no_limits_in_namespace(api: Api) -> None:
    """`get_limits_returns_empty_if_no_limits_in_namespace`, integration_tests.rs."""
    assert api.limits("test_namespace") == []


def test_add_limit_only_adds_if_not_present(api: Api) -> None:
    """`add_limit_only_adds_if_not_present`, integration_tests.rs: limits differing only in
    max_value or name are one limit, and the first one given stays."""
    [known] = api.limits("add_limit_only_adds_if_not_present")
    assert known["max_value"] == 10
    assert known["name"] is None


# -- deciding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("namespace", ["rate_limited", "rate_limited_id_counter"])
def test_rate_limited(api: Api, namespace: str) -> None:
    """`rate_limited` and `rate_limited_id_counter`, integration_tests.rs: check then report,
    three times within a limit of 3; the fourth check is limited. A limit with an `id` (which
    Limitador keys its counters by) counts the same way."""
    for hit in range(3):
        assert api.check(namespace, GET) == 200, f"must not be limited after {hit}"
        assert api.report(namespace, GET) == 200
    assert api.check(namespace, GET) == 429


def test_multiple_limits_rate_limited(api: Api) -> None:
    """`multiple_limits_rate_limited`, integration_tests.rs: GETs (3) and POSTs (4) of one app are
    counted by their own limits."""
    namespace = "multiple_limits_rate_limited"
    for hit in range(3):
        assert api.check(namespace, GET) == 200, f"must not be limited after {hit}"
        assert api.check(namespace, POST) == 200, f"must not be limited after {hit}"
        assert api.check_and_report(namespace, GET) == 200
        assert api.check_and_report(namespace, POST) == 200
    assert api.check(namespace, GET) == 429
    assert api.check(namespace, POST) == 200


def test_rate_limited_with_delta_higher_than_one(api: Api) -> None:
    """`rate_limited_with_delta_higher_than_one`, integration_tests.rs: 5 + 5 fill a limit of 10."""
    namespace = "rate_limited_with_delta_higher_than_one"
    for _ in range(2):
        assert api.check(namespace, GET, 5) == 200
        assert api.report(namespace, GET, 5) == 200
    assert api.check(namespace, GET, 1) == 429


def test_rate_limited_with_delta_higher_than_max(api: Api) -> None:
    """`rate_limited_with_delta_higher_than_max`, integration_tests.rs: 11 never fits in 10, even
    on a fresh counter, and the refused check_and_report charges nothing."""
    namespace = "rate_limited_with_delta_higher_than_max"
    assert api.check(namespace, GET, 11) == 429
    assert api.check_and_report(namespace, GET, 11) == 429
    assert api.check_and_report(namespace, GET, 10) == 200


def test_takes_into_account_only_vars_of_the_limits(api: Api) -> None:
    """`takes_into_account_only_vars_of_the_limits`, integration_tests.rs: an entry no limit uses
    does not qualify the counter."""
    namespace = "takes_into_account_only_vars_of_the_limits"
    for hit in range(3):
        values = {**GET, "does_not_apply": str(hit)}
        assert api.check(namespace, values) == 200, f"must not be limited after {hit}"
        assert api.report(namespace, values) == 200
    assert api.check(namespace, GET) == 429
    assert len(api.counters(namespace)) == 1


def test_is_rate_limited_returns_false_when_no_limits_in_namespace(api: Api) -> None:
    """`is_rate_limited_returns_false_when_no_limits_in_namespace`, integration_tests.rs."""
    assert api.check("test_namespace", {"req_method": "GET"}) == 200


def test_is_rate_limited_returns_false_when_no_matching_limits(api: Api) -> None:
    """`is_rate_limited_returns_false_when_no_matching_limits`, integration_tests.rs: a limit of 0
    on GETs does not touch a POST."""
    assert api.check("is_rate_limited_returns_false_when_no_matching_limits", POST) == 200


def test_is_rate_limited_applies_limit_if_its_unconditional(api: Api) -> None:
    """`is_rate_limited_applies_limit_if_its_unconditional`, integration_tests.rs."""
    assert api.check("is_rate_limited_applies_limit_if_its_unconditional", {"app_id": "test_app_id"}) == 429


def test_check_rate_limited_and_update(api: Api) -> None:
    """`check_rate_limited_and_update`, integration_tests.rs."""
    namespace = "check_rate_limited_and_update"
    assert [api.check_and_report(namespace, GET) for _ in range(4)] == [200, 200, 200, 429]


def test_check_rate_limited_and_update_load_counters(api: Api) -> None:
    """`check_rate_limited_and_update_load_counters`, integration_tests.rs: with counters loaded
    (draft-03 headers asked for) each answer shows the one counter, its remaining 2, 1, 0, then 0
    when limited, and a reset within the 60 s window."""
    namespace = "check_rate_limited_and_update_load_counters"
    answers = [api.call("check_and_report", namespace, GET, response_headers="DraftVersion03") for _ in range(4)]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 429]
    assert [answer.headers["X-RateLimit-Remaining"] for answer in answers] == ["2", "1", "0", "0"]
    assert {answer.headers["X-RateLimit-Limit"] for answer in answers} == {"3, 3;w=60"}
    assert all(0 <= int(answer.headers["X-RateLimit-Reset"]) <= 60 for answer in answers)


def test_check_rate_limited_and_update_returns_true_if_no_limits_apply(api: Api) -> None:
    """`check_rate_limited_and_update_returns_true_if_no_limits_apply`, integration_tests.rs (the
    name says "true"; the case asserts "not limited")."""
    assert api.check_and_report("check_rate_limited_and_update_returns_true_if_no_limits_apply", POST) == 200


def test_check_rate_limited_and_update_applies_limit_if_its_unconditional(api: Api) -> None:
    """`check_rate_limited_and_update_applies_limit_if_its_unconditional`, integration_tests.rs."""
    namespace = "check_rate_limited_and_update_applies_limit_if_its_unconditional"
    assert api.check_and_report(namespace, {"app_id": "test_app_id"}) == 429


# -- counters --------------------------------------------------------------------------------------


def test_get_counters(api: Api) -> None:
    """`get_counters`, integration_tests.rs: one limit, two apps reported 1 and 5 of 10; two
    counters, told apart by `set_variables`."""
    namespace = "get_counters"
    assert api.report(namespace, {"req_method": "GET", "app_id": "1"}, 1) == 200
    assert api.report(namespace, {"req_method": "GET", "app_id": "2"}, 5) == 200
    assert len(api.limits(namespace)) == 1
    counters = api.counters(namespace)
    assert len(counters) == 2
    assert api.remaining_by(namespace) == {"1": 9, "2": 5}
    for counter in counters:
        assert counter["limit"] == served(limit(namespace, 10))
        assert 0 < counter["expires_in_seconds"] <= 60


def test_get_counters_returns_empty_when_no_limits_in_namespace(api: Api) -> None:
    """`get_counters_returns_empty_when_no_limits_in_namespace`, integration_tests.rs."""
    assert api.counters("test_namespace") == []


def test_get_counters_returns_empty_when_no_counters_in_namespace(api: Api) -> None:
    """`get_counters_returns_empty_when_no_counters_in_namespace`, integration_tests.rs: a limit
    no request has touched has no counter, and neither does a read-only check."""
    namespace = "get_counters_returns_empty_when_no_counters_in_namespace"
    assert api.counters(namespace) == []
    assert api.check(namespace, GET) == 200
    assert api.counters(namespace) == []


def test_get_counters_does_not_return_expired_ones(api: Api) -> None:
    """`get_counters_does_not_return_expired_ones`, integration_tests.rs: a 1 s window's counter
    is listed, then gone once the window is over (polled, not slept: no timing is asserted)."""
    namespace = "get_counters_does_not_return_expired_ones"
    assert api.report(namespace, {"req_method": "GET", "app_id": "1"}) == 200
    # Under load the window may be over already; a counter still listed is the one reported.
    for counter in api.counters(namespace):
        assert (counter["set_variables"], counter["remaining"]) == ({APP_ID: "1"}, 9)
    wait_until(lambda: api.counters(namespace) == [], timeout=20, what="the 1 s counter to expire")


# -- several replicas --------------------------------------------------------------------------------


def test_distributed_rate_limited(
    api: Api, service: ServiceProcess, request: pytest.FixtureRequest
) -> None:
    """`distributed_rate_limited`, integration_tests.rs (Limitador's `distributed` storage, two
    nodes): hits alternate between two replicas, and the limit of 3 holds across them. Our
    replicas share a Redis instead; the in-process memory storage has no peers (README.md)."""
    if storage_of(service) != "redis":
        # Memory counters are per process; redis_cached replicas meet only at their write-backs
        # (tests/test_redis_replicas.py), and a second process would cost this module seconds.
        pytest.skip("replicas share counters through the redis storage")
    other = start_on("redis", service.limits_file, request)  # type: ignore[arg-type]
    try:
        replicas = [api, Api(other)]
        namespace = "distributed_rate_limited"
        for hit in range(3):
            replica = replicas[hit % 2]
            assert replica.check(namespace, GET) == 200, f"must not be limited after {hit}"
            assert replica.report(namespace, GET) == 200
        # redis_cached writes charges back in batches: eventually, as in Limitador's case.
        wait_until(lambda: api.check(namespace, GET) == 429, timeout=10, what="the first replica to see 3 hits")
        wait_until(lambda: Api(other).check(namespace, GET) == 429, timeout=10, what="the second replica to see 3 hits")
    finally:
        other.close()

