"""Limitador's cases that change limits at run time, black-box: `configure_with`, `delete_limit`
and `delete_limits` (`limitador/tests/integration_tests.rs`, `limitador/src/lib.rs` tests).

The Limitador server calls `configure_with` when its limits file changes; so do these tests: they
rewrite the running service's limits file and wait for `/status` to show the new version. Each
case owns its namespaces; one service per storage (memory, redis, redis_cached) for the module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.limitador_conformance.harness import Api, ReloadableLimits, limit, serving
from tests.service_fixtures import ServiceProcess

APP_1 = {"req_method": "GET", "app_id": "1"}

INITIAL: list[dict[str, Any]] = [
    limit("doesnt_return_first", 10),
    limit("doesnt_return_second", 20),
    limit("delete_limit", 10),
    limit("delete_limit_also_deletes_associated_counters", 10),
    limit("delete_limits_of_a_namespace", 10, conditions=("descriptors[0]['req_method'] == 'POST'",)),
    limit("delete_limits_of_a_namespace", 5),
    limit("delete_limits_of_a_namespace_1", 10, conditions=("descriptors[0]['x'] == '10'",),
          variables=("descriptors[0]['z']",)),
    limit("delete_limits_of_a_namespace_2", 5, conditions=("descriptors[0]['x'] == '10'",),
          variables=("descriptors[0]['z']",)),
    limit("delete_limits_of_a_namespace_also_deletes_counters", 5),
    limit("configure_with_keeps_the_given_limits_and_counters_if_they_exist", 10),
    limit("configure_with_deletes_all_except_the_limits_given", 10, seconds=1),
    limit("configure_with_deletes_all_except_the_limits_given", 20),
    limit("configure_with_updates_the_limits", 10),
    limit("properly_updates_existing_limits", 42, seconds=100, conditions=(), variables=()),
    limit("deletes_qualified_counters", 42, seconds=100, conditions=(), variables=("descriptors[0]['x']",)),
]


@pytest.fixture(scope="module", params=["memory", "redis", "redis_cached"])
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with serving(request.param, INITIAL, request, tmp_path_factory, "--reload-interval", "0.05") as service:
        yield service


@pytest.fixture
def limits(service: ServiceProcess) -> ReloadableLimits:
    assert service.limits_file is not None
    return ReloadableLimits(service.limits_file, service, INITIAL)


def max_values(api: Api, namespace: str) -> list[int]:
    return sorted(entry["max_value"] for entry in api.limits(namespace))


def assert_removing_the_limits_removes_the_counter(api: Api, limits: ReloadableLimits, namespace: str) -> None:
    """A reported counter of `namespace` goes when the reload removes the namespace's limits."""
    assert api.report(namespace, APP_1) == 200
    assert len(api.counters(namespace)) == 1
    limits.replace(namespace, [])
    assert api.counters(namespace) == []


def test_get_namespaces_doesnt_return_the_ones_that_no_longer_have_limits(api: Api, limits: ReloadableLimits) -> None:
    """`get_namespaces_doesnt_return_the_ones_that_no_longer_have_limits`, integration_tests.rs."""
    limits.replace("doesnt_return_second", [])
    assert max_values(api, "doesnt_return_first") == [10]
    assert api.limits("doesnt_return_second") == []


def test_delete_limit(api: Api, limits: ReloadableLimits) -> None:
    """`delete_limit`, integration_tests.rs."""
    assert max_values(api, "delete_limit") == [10]
    limits.replace("delete_limit", [])
    assert api.limits("delete_limit") == []


def test_delete_limit_also_deletes_associated_counters(api: Api, limits: ReloadableLimits) -> None:
    """`delete_limit_also_deletes_associated_counters`, integration_tests.rs."""
    assert_removing_the_limits_removes_the_counter(api, limits, "delete_limit_also_deletes_associated_counters")


def test_delete_limits_of_a_namespace(api: Api, limits: ReloadableLimits) -> None:
    """`delete_limits_of_a_namespace`, integration_tests.rs: both limits of the namespace go."""
    assert max_values(api, "delete_limits_of_a_namespace") == [5, 10]
    limits.replace("delete_limits_of_a_namespace", [])
    assert api.limits("delete_limits_of_a_namespace") == []


def test_delete_limits_does_not_delete_limits_from_other_namespaces(api: Api, limits: ReloadableLimits) -> None:
    """`delete_limits_does_not_delete_limits_from_other_namespaces`, integration_tests.rs."""
    limits.replace("delete_limits_of_a_namespace_1", [])
    assert api.limits("delete_limits_of_a_namespace_1") == []
    assert max_values(api, "delete_limits_of_a_namespace_2") == [5]


def test_delete_limits_of_a_namespace_also_deletes_counters(api: Api, limits: ReloadableLimits) -> None:
    """`delete_limits_of_a_namespace_also_deletes_counters`, integration_tests.rs."""
    assert_removing_the_limits_removes_the_counter(api, limits, "delete_limits_of_a_namespace_also_deletes_counters")


def test_configure_with_creates_the_given_limits(api: Api, limits: ReloadableLimits) -> None:
    """`configure_with_creates_the_given_limits`, integration_tests.rs: limits of two namespaces
    that did not exist are served after the reload."""
    limits.replace("configure_with_creates_first", [limit("configure_with_creates_first", 10)])
    limits.replace("configure_with_creates_second", [limit("configure_with_creates_second", 20)])
    assert max_values(api, "configure_with_creates_first") == [10]
    assert max_values(api, "configure_with_creates_second") == [20]
    assert api.check_and_report("configure_with_creates_first", APP_1, 10) == 200
    assert api.check_and_report("configure_with_creates_first", APP_1) == 429


def test_configure_with_keeps_the_given_limits_and_counters_if_they_exist(
    api: Api, limits: ReloadableLimits
) -> None:
    """`configure_with_keeps_the_given_limits_and_counters_if_they_exist`, integration_tests.rs:
    a reload that gives the same limit again keeps it and its counter (1 of 10 used)."""
    namespace = "configure_with_keeps_the_given_limits_and_counters_if_they_exist"
    assert api.report(namespace, APP_1) == 200
    # The same limit written differently (another key order, a name) is the same limit.
    limits.replace(namespace, [{"name": "kept", **limit(namespace, 10)}])
    assert [entry["name"] for entry in api.limits(namespace)] == ["kept"]
    assert api.remaining_by(namespace) == {"1": 9}


def test_configure_with_deletes_all_except_the_limits_given(api: Api, limits: ReloadableLimits) -> None:
    """`configure_with_deletes_all_except_the_limits_given`, integration_tests.rs."""
    namespace = "configure_with_deletes_all_except_the_limits_given"
    limits.replace(namespace, [limit(namespace, 10, seconds=1)])
    assert [(entry["max_value"], entry["seconds"]) for entry in api.limits(namespace)] == [(10, 1)]


def test_configure_with_updates_the_limits(api: Api, limits: ReloadableLimits) -> None:
    """`configure_with_updates_the_limits`, integration_tests.rs: max_value 10 becomes 20, still
    one limit (max_value is not part of a limit's identity)."""
    namespace = "configure_with_updates_the_limits"
    limits.replace(namespace, [limit(namespace, 20)])
    assert max_values(api, namespace) == [20]


def test_properly_updates_existing_limits(api: Api, limits: ReloadableLimits) -> None:
    """`properly_updates_existing_limits`, limitador/src/lib.rs: after max_value 42 becomes 50
    the counter already charged is decided against 50 (its headers show the new limit) and keeps
    its hits."""
    namespace = "properly_updates_existing_limits"
    first = api.call("check_and_report", namespace, {}, response_headers="DraftVersion03")
    assert first.status_code == 200
    assert first.headers["X-RateLimit-Limit"] == "42, 42;w=100"
    assert first.headers["X-RateLimit-Remaining"] == "41"
    limits.replace(namespace, [limit(namespace, 50, seconds=100, conditions=(), variables=())])
    assert max_values(api, namespace) == [50]
    second = api.call("check_and_report", namespace, {}, response_headers="DraftVersion03")
    assert second.status_code == 200
    assert second.headers["X-RateLimit-Limit"] == "50, 50;w=100"
    assert second.headers["X-RateLimit-Remaining"] == "48"


def test_deletes_qualified_counters(api: Api, limits: ReloadableLimits, request: pytest.FixtureRequest) -> None:
    """`deletes_qualified_counters`, limitador/src/lib.rs: a limit deleted and added again starts
    from fresh counters (41 of 42 left after one hit, both times). A deliberate difference on the
    memory storage (issue 10, limits file safety): counters of a removed limit are kept for one
    window, so a limit that comes back within it resumes its counts (40 left after the second hit)."""
    namespace = "deletes_qualified_counters"
    entry = limit(namespace, 42, seconds=100, conditions=(), variables=("descriptors[0]['x']",))

    def remaining_after_one_hit() -> str:
        answer = api.call("check_and_report", namespace, {"x": "a"}, response_headers="DraftVersion03")
        assert answer.status_code == 200
        return answer.headers["X-RateLimit-Remaining"]

    assert remaining_after_one_hit() == "41"
    limits.replace(namespace, [])
    assert api.limits(namespace) == []
    limits.replace(namespace, [entry])
    storage = request.node.callspec.params["service"]
    assert remaining_after_one_hit() == ("40" if storage == "memory" else "41")
    assert [c["set_variables"] for c in api.counters(namespace)] == [{"descriptors[0]['x']": "a"}]

