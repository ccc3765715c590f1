"""Loading Limitador limits files: what is accepted, and errors that say where and why."""

from __future__ import annotations

import pickle

import pytest

from ratelimit.limits import (
    InvalidLimit,
    Limit,
    LimitsError,
    dump_limits,
    load_limits_file,
    parse_limits,
    unique_limits,
)

LIMITADOR_EXAMPLE = """
- namespace: test_namespace
  max_value: 1000000
  seconds: 60
  conditions:
  variables:
- namespace: test_namespace
  max_value: 5
  seconds: 60
  conditions: ["descriptors[0]['req.method'] == 'POST'"]
  variables: ["descriptors[0]['user_id']"]
"""


def test_limitador_repository_example_loads() -> None:
    limits = parse_limits(LIMITADOR_EXAMPLE)
    assert [(limit.max_value, limit.conditions, limit.variables) for limit in limits] == [
        (1000000, (), ()),
        (5, ("descriptors[0]['req.method'] == 'POST'",), ("descriptors[0]['user_id']",)),
    ]


def test_identity_ignores_max_value_name_and_order() -> None:
    a = Limit("ns", 10, 60, ("descriptors[0].a == '1'", "descriptors[0].b == '2'"), ("descriptors[0].u",), name="x")
    b = Limit("ns", 99, 60, ("descriptors[0].b == '2'", "descriptors[0].a == '1'"), ("descriptors[0].u",), name="y")
    assert a.identity == b.identity
    assert a.identity != Limit("ns", 10, 61, a.conditions, a.variables).identity
    # Limits compare and hash by identity, so sets and dicts of limits dedupe them.
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != Limit("ns", 10, 61, a.conditions, a.variables)
    assert unique_limits([a, b, Limit("ns", 1, 5)]) == [a, Limit("ns", 1, 5)]
    assert unique_limits([a, b])[0] is a
    copy = pickle.loads(pickle.dumps(a))  # to another process: rebuilt, CEL compiled again there
    assert copy == a and (copy.max_value, copy.name) == (10, "x") and copy.predicates == a.predicates


def test_a_limit_validates_itself_and_names_the_field() -> None:
    with pytest.raises(InvalidLimit, match=r"^seconds: must be between 1 and"):
        Limit("ns", 10, 0)
    with pytest.raises(InvalidLimit, match=r"^max_value: must be between 0 and"):
        Limit("ns", -1, 60)
    with pytest.raises(InvalidLimit, match=r"^namespace: must not be empty"):
        Limit("", 1, 60)
    with pytest.raises(InvalidLimit) as raised:
        Limit("ns", 1, 60, ("descriptors[0].a == '1'", "descriptors[0]["))
    assert raised.value.field == "conditions[1]"
    limit = Limit("ns", 1, 60, ("descriptors[0].b == '2'", "descriptors[0].a == '1'"), ("descriptors[0].u",))
    # Compiled once, in the sorted order of the texts they came from.
    assert [p.source for p in limit.predicates] == list(limit.conditions)
    assert [e.source for e in limit.expressions] == list(limit.variables)


def test_same_identity_collapses_into_the_first_as_in_limitador() -> None:
    limits = parse_limits(
        "- {namespace: ns, max_value: 1, seconds: 60}\n- {namespace: ns, max_value: 2, seconds: 60, name: b}\n"
    )
    assert [(limit.max_value, limit.name) for limit in limits] == [(1, None)]


def test_empty_file_means_no_limits() -> None:
    assert parse_limits("") == []
    assert parse_limits("[]") == []


@pytest.mark.parametrize(
    ("document", "field", "line", "words"),
    [
        ("- namespace: ns\n  max_value: lots\n  seconds: 60\n", "max_value", 2, "whole number"),
        ("- namespace: ns\n  max_value: -1\n  seconds: 60\n", "max_value", 2, "between 0"),
        ("- namespace: ns\n  max_value: 1\n  seconds: 0\n", "seconds", 3, "between 1"),
        ("- namespace: ns\n  max_value: true\n  seconds: 60\n", "max_value", 2, "whole number"),
        ("- max_value: 1\n  seconds: 60\n", "namespace", 1, "required"),
        ("- namespace: ns\n  max_value: 1\n  seconds: 60\n  variable: [x]\n", "variable", 4, "unknown field"),
        ("- namespace: ns\n  max_value: 1\n  seconds: 60\n  conditions: [1]\n", "conditions[0]", 4, "CEL string"),
        ("- namespace: ns\n  max_value: 1\n  seconds: 60\n  conditions: \"a == 'b'\"\n", "conditions", 4, "list"),
    ],
)
def test_errors_name_the_field_and_line(document: str, field: str, line: int, words: str) -> None:
    with pytest.raises(LimitsError) as caught:
        parse_limits(document, "limits.yaml")
    error = caught.value
    assert (error.field, error.line, error.index) == (field, line, 0)
    assert words in error.message
    assert str(error).startswith(f"limits.yaml:{line}: limit #0: field '{field}'")


def test_second_limit_is_named_by_index() -> None:
    document = "- {namespace: ns, max_value: 1, seconds: 60}\n- {namespace: ns, max_value: x, seconds: 60}\n"
    with pytest.raises(LimitsError) as caught:
        parse_limits(document)
    assert (caught.value.index, caught.value.line, caught.value.field) == (1, 2, "max_value")


def test_limitador_1x_condition_is_rejected_with_the_2x_form() -> None:
    document = "- namespace: ns\n  max_value: 1\n  seconds: 60\n  conditions: [\"req.method == 'POST'\"]\n"
    with pytest.raises(LimitsError) as caught:
        parse_limits(document, "old.yaml")
    assert caught.value.field == "conditions[0]"
    assert "descriptors[0]['req.method'] == 'POST'" in str(caught.value)


def test_invalid_cel_names_the_variable() -> None:
    document = "- namespace: ns\n  max_value: 1\n  seconds: 60\n  variables: [\"descriptors[0]['user'\"]\n"
    with pytest.raises(LimitsError) as caught:
        parse_limits(document)
    assert caught.value.field == "variables[0]"


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(LimitsError) as caught:
        parse_limits("- namespace: ns\n  max_value: [1\n", "broken.yaml")
    assert caught.value.line is not None and "not valid YAML" in str(caught.value)


def test_missing_file_is_a_limits_error(tmp_path) -> None:
    with pytest.raises(LimitsError, match="cannot read"):
        load_limits_file(tmp_path / "absent.yaml")


def test_dump_round_trips() -> None:
    limits = parse_limits(LIMITADOR_EXAMPLE)
    again = parse_limits(dump_limits(limits))
    assert [limit.to_dict() for limit in again] == [limit.to_dict() for limit in limits]
