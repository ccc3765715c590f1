"""Limitador's unit tests of limits, counters and CEL (`limitador/src/limit.rs`,
`limitador/src/counter.rs`, `limitador/src/limit/cel.rs`, `limitador/src/storage/in_memory.rs`),
black-box: each case's limit is served by `ratelimit serve` (memory storage) and decided through
the HTTP API or the Envoy RLS.

"The limit applies" is observed with a limit of 0: a request it applies to is refused
(`POST /check` answers 429), any other is admitted. "The variable resolves to V" is observed in
`GET /counters` (`set_variables`). Library roots (`x`, `y`, `foo`) are descriptor entries here
(`descriptors[0].x`), as through Limitador's servers.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest, RateLimitResponse

from tests.limitador_conformance.harness import Api, limit, serving
from tests.service_fixtures import ServiceProcess
from tests.support import REPO

X_IS_5 = 'descriptors[0].x == "5"'
Y_IS_2 = 'descriptors[0].y == "2"'

LIMITS = [
    limit("limit_can_have_an_optional_name", 10, conditions=(X_IS_5,), variables=("descriptors[0].y",)),
    limit("limit_can_have_an_optional_name", 10, seconds=61, conditions=(X_IS_5,), variables=("descriptors[0].y",),
          name="Test Limit"),
    limit("limit_applies", 0, conditions=(X_IS_5,), variables=("descriptors[0].y",)),
    limit("limit_applies_when_all_its_conditions_apply", 0, conditions=(X_IS_5, Y_IS_2),
          variables=("descriptors[0].z",)),
    limit("limit_id", 10, id="test_id"),
    # partial_equality: same identity, so one limit; the first one given is kept.
    limit("partial_equality", 42, id="test_id"),
    limit("partial_equality", 52, name="Who cares?"),
    limit("resolves_variables", 10, conditions=(), variables=("int(descriptors[0].x) * 3",)),
    limit("conditions_have_limit_info_unnamed", 0, conditions=("limit.name == 'named_limit'",), variables=()),
    limit("conditions_have_limit_info_named", 0, conditions=("limit.name == 'named_limit'",), variables=(),
          name="named_limit"),
    limit("conditions_have_limit_info_id", 0, conditions=("limit.id == 'my_id'", "limit.name == null"),
          variables=(), id="my_id"),
    limit("conditions_have_limit_info_other_id", 0, conditions=("limit.id == 'other_id'",), variables=(),
          id="my_id"),
    limit("cel_limit_applies", 10, conditions=("descriptors[0].foo.contains('bar')",),
          variables=("descriptors[0].bar.endsWith('baz')",)),
    limit("counter_resolves_variables", 10, conditions=(), variables=("timestamp(descriptors[0].ts).getHours()",)),
    limit("expression", 10, conditions=(), variables=("100",)),
    limit("unexpected_value_type_expression", 0, conditions=(), variables=("['100']",)),
    limit("predicate", 0, conditions=("42 == uint('42')",), variables=()),
    limit("predicate_no_key", 0, conditions=("descriptors[0].not == 42",), variables=()),
    limit("unexpected_value_predicate", 0, conditions=("42",), variables=()),
    limit("supports_list_bindings", 0, conditions=("descriptors[0].key == '1' && descriptors[1]['key'] == '2'",),
          variables=()),
    limit("counters_for_multiple_limit_per_ns", 1, seconds=60, conditions=(), variables=("descriptors[0].app_id",)),
    limit("counters_for_multiple_limit_per_ns", 1, seconds=600, conditions=(), variables=("descriptors[0].app_id",)),
]


@pytest.fixture(scope="module")
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with serving("memory", LIMITS, request, tmp_path_factory) as service:
        yield service


def applies(api: Api, namespace: str, values: dict[str, str]) -> bool:
    """Whether the namespace's limit of 0 applies to a request with these entries."""
    return api.check(namespace, values) == 429


def set_variables(api: Api, namespace: str, values: dict[str, str]) -> list[dict[str, str]]:
    assert api.report(namespace, values) == 200
    return [counter["set_variables"] for counter in api.counters(namespace)]


# -- limit.rs --------------------------------------------------------------------------------------


def test_limit_can_have_an_optional_name(api: Api) -> None:
    """`limit_can_have_an_optional_name`, limit.rs: `name` is null unless given."""
    names = {entry["seconds"]: entry["name"] for entry in api.limits("limit_can_have_an_optional_name")}
    assert names == {60: None, 61: "Test Limit"}


def test_limit_applies(api: Api) -> None:
    """`limit_applies`, limit.rs: x == "5" holds and y resolves."""
    assert applies(api, "limit_applies", {"x": "5", "y": "1"})


def test_limit_does_not_apply_when_cond_is_false(api: Api) -> None:
    """`limit_does_not_apply_when_cond_is_false`, limit.rs."""
    assert not applies(api, "limit_applies", {"x": "1", "y": "1"})


def test_limit_does_not_apply_when_cond_var_is_not_set(api: Api) -> None:
    """`limit_does_not_apply_when_cond_var_is_not_set`, limit.rs: no `x` entry at all."""
    assert not applies(api, "limit_applies", {"a": "1", "y": "1"})


def test_limit_does_not_apply_when_var_not_set(api: Api) -> None:
    """`limit_does_not_apply_when_var_not_set`, limit.rs: the condition holds, but the variable
    `y` has no value, so there is no counter to charge."""
    assert not applies(api, "limit_applies", {"x": "5"})


def test_limit_applies_when_all_its_conditions_apply(api: Api) -> None:
    """`limit_applies_when_all_its_conditions_apply`, limit.rs."""
    assert applies(api, "limit_applies_when_all_its_conditions_apply", {"x": "5", "y": "2", "z": "1"})


def test_limit_does_not_apply_if_one_cond_doesnt(api: Api) -> None:
    """`limit_does_not_apply_if_one_cond_doesnt`, limit.rs."""
    assert not applies(api, "limit_applies_when_all_its_conditions_apply", {"x": "3", "y": "2", "z": "1"})


def test_limit_id(api: Api) -> None:
    """`limit_id`, limit.rs: the `id` is kept and shown."""
    assert [entry["id"] for entry in api.limits("limit_id")] == ["test_id"]


def test_partial_equality(api: Api) -> None:
    """`partial_equality`, limit.rs: an id, max_value and name are not part of a limit's
    identity; two limits equal in namespace, seconds, conditions and variables are one."""
    [kept] = api.limits("partial_equality")
    assert (kept["id"], kept["max_value"], kept["name"]) == ("test_id", 42, None)


def test_resolves_variables(api: Api) -> None:
    """`resolves_variables`, limit.rs: a variable may compute (`int(x) * 3`)."""
    assert set_variables(api, "resolves_variables", {"x": "5"}) == [{"int(descriptors[0].x) * 3": "15"}]


def test_conditions_have_limit_info(api: Api) -> None:
    """`conditions_have_limit_info`, limit.rs: conditions see `limit.name` and `limit.id`
    (null when unset)."""
    assert not applies(api, "conditions_have_limit_info_unnamed", {})
    assert applies(api, "conditions_have_limit_info_named", {})
    assert applies(api, "conditions_have_limit_info_id", {})
    assert not applies(api, "conditions_have_limit_info_other_id", {})


def test_cel_limit_applies(api: Api) -> None:
    """`cel_limit_applies`, limit.rs: CEL string functions in a condition and in a variable, whose
    counter is qualified by the variable's value as text ("true")."""
    values = {"foo": "nice bar!", "bar": "foo,baz"}
    assert set_variables(api, "cel_limit_applies", values) == [{"descriptors[0].bar.endsWith('baz')": "true"}]


# -- counter.rs, in_memory.rs ----------------------------------------------------------------------


def test_counter_resolves_variables(api: Api) -> None:
    """`resolves_variables`, counter.rs: `timestamp(ts).getHours()` of 2019-10-12T13:20:50.52Z is 13."""
    found = set_variables(api, "counter_resolves_variables", {"ts": "2019-10-12T13:20:50.52Z"})
    assert found == [{"timestamp(descriptors[0].ts).getHours()": "13"}]


def test_counters_for_multiple_limit_per_ns(api: Api) -> None:
    """`counters_for_multiple_limit_per_ns`, storage/in_memory.rs: two limits that differ only in
    their window each get a counter for the same app (Limitador's windows are 1 s and 10 s; longer
    here, so that neither can expire before it is listed)."""
    assert api.report("counters_for_multiple_limit_per_ns", {"app_id": "foo"}) == 200
    windows = sorted(c["limit"]["seconds"] for c in api.counters("counters_for_multiple_limit_per_ns"))
    assert windows == [60, 600]


# -- limit/cel.rs ----------------------------------------------------------------------------------


def test_expression(api: Api) -> None:
    """`expression`, cel.rs: the constant expression `100` evaluates to "100"."""
    assert set_variables(api, "expression", {}) == [{"100": "100"}]


def test_unexpected_value_type_expression(api: Api) -> None:
    """`unexpected_value_type_expression`, cel.rs: a variable whose value is a list is an
    evaluation error in Limitador (which fails the request); here it does not resolve, so the
    limit (of 0) does not apply (README.md lists the difference)."""
    assert not applies(api, "unexpected_value_type_expression", {})


def test_predicate(api: Api) -> None:
    """`predicate`, cel.rs: `42 == uint('42')` is true."""
    assert applies(api, "predicate", {})


def test_predicate_no_key(api: Api) -> None:
    """`predicate_no_key`, cel.rs: a missing key makes the condition false, not an error."""
    assert not applies(api, "predicate_no_key", {"there": ""})


def test_unexpected_value_predicate(api: Api) -> None:
    """`unexpected_value_predicate`, cel.rs: a condition whose value is not a boolean (`42`) is
    an evaluation error in Limitador (which fails the request); here it is false, so the limit
    does not apply (README.md lists the difference)."""
    assert not applies(api, "unexpected_value_predicate", {})


def test_supports_list_bindings(service: ServiceProcess) -> None:
    """`supports_list_bindings`, cel.rs: `descriptors` is a list, one map per RLS descriptor, read
    with `.key` and `['key']` alike."""
    stub = rls_pb2_grpc.RateLimitServiceStub(service.grpc)

    def code(*maps: dict[str, str]) -> int:
        descriptors = [RateLimitDescriptor(entries=[RateLimitDescriptor.Entry(key=k, value=v) for k, v in m.items()])
                       for m in maps]
        answer = stub.ShouldRateLimit(RateLimitRequest(domain="supports_list_bindings", descriptors=descriptors))
        return answer.overall_code

    assert code({"key": "1"}, {"key": "2"}) == RateLimitResponse.OVER_LIMIT
    assert code({"key": "1"}, {"key": "3"}) == RateLimitResponse.OK
    assert code({"key": "1"}) == RateLimitResponse.OK


def test_predicate_no_var(tmp_path: Path) -> None:
    """`predicate_no_var`, cel.rs: a condition on a name that is not defined (`not_there == 42`)
    is false in Limitador. Here the only roots are `descriptors` and `limit`, so such a limit is
    refused when the file is loaded, naming the expression (README.md lists the difference)."""
    path = tmp_path / "limits.yaml"
    path.write_text(yaml.safe_dump([limit("predicate_no_var", 0, conditions=("not_there == 42",), variables=())]))
    result = subprocess.run([sys.executable, "-m", "ratelimit.cli", "validate", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "not_there" in result.stderr and "conditions[0]" in result.stderr
