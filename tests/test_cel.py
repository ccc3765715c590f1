"""Specification of ratelimit.cel: CEL conditions and variables, Limitador 2.x semantics.

The CEL library is the reference: every fast-path answer must equal what the
library gives for the same text and context.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.cel import (
    CelError,
    Expression,
    Predicate,
    _library_expression,
    _library_predicate,
    compile_expression,
    compile_predicate,
)

DESCRIPTORS = [{"model": "gpt-4o", "user": "alice", "req.method": "POST"}, {"tier": "gold"}]
LIMIT = {"name": "per-user", "id": None}


def check_predicate(source: str, expected: bool, *, fast: bool) -> None:
    predicate = compile_predicate(source)
    assert predicate.is_fast is fast
    assert predicate.test(DESCRIPTORS, LIMIT) is expected
    assert _library_predicate(source).test(DESCRIPTORS, LIMIT) is expected


def check_expression(source: str, expected: str | None, *, fast: bool) -> None:
    expression = compile_expression(source)
    assert expression.is_fast is fast
    assert expression.evaluate(DESCRIPTORS, LIMIT) == expected
    assert _library_expression(source).evaluate(DESCRIPTORS, LIMIT) == expected


# ---------------------------------------------------------------------------
# The fast path covers the common forms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # descriptor look-ups, in all three spellings
        ("descriptors[0]['model'] == 'gpt-4o'", True),
        ('descriptors[0]["model"] == "gpt-4o"', True),
        ("descriptors[0].model == 'gpt-4o'", True),
        ("descriptors[1].tier == 'gold'", True),
        ("descriptors[0]['req.method'] == 'POST'", True),
        ("descriptors[0].model != 'gpt-4o'", False),
        ("'gpt-4o' == descriptors[0].model", True),
        ("descriptors[0].model == descriptors[0].user", False),
        # limit name / id (id is null here)
        ("limit.name == 'per-user'", True),
        ("limit.id == 'x'", False),
        ("limit.id != 'x'", True),
        # logic and grouping
        ("true", True),
        ("false", False),
        ("!false", True),
        ("!!true", True),
        ("!!!false", True),
        ("descriptors[0].user == 'alice' && descriptors[1].tier == 'gold'", True),
        ("descriptors[0].user == 'bob' || descriptors[1].tier == 'gold'", True),
        ("!(descriptors[0].user == 'bob')", True),
        ("false && true || true", True),  # && binds tighter than ||
        ("false && (true || true)", False),
        # membership and affixes
        ("descriptors[0].model in ['gpt-4o', 'gpt-4o-mini']", True),
        ("descriptors[0].model in []", False),
        ("limit.id in ['x']", False),  # null is simply not a member
        ("descriptors[0].model.startsWith('gpt-')", True),
        ("descriptors[0].model.endsWith('4o')", True),
        ("descriptors[0].model.startsWith(descriptors[0].user)", False),
        # relations are left-associative on one precedence level
        ("descriptors[0].model == 'gpt-4o' == true", True),
        ("descriptors[0].model == 'x' in ['false']", False),  # a bool is not a member
        # escapes
        (r"'a\'b' == " + '"a\'b"', True),
        (r"'\t\\' == '\t\\'", True),
    ],
)
def test_fast_predicates(source: str, expected: bool) -> None:
    check_predicate(source, expected, fast=True)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("descriptors[0].user", "alice"),
        ("descriptors[1]['tier']", "gold"),
        ("limit.name", "per-user"),
        ("limit.id", "null"),  # null is a value, stringified as Limitador does
        ("'literal'", "literal"),
        ("true", "true"),
        ("descriptors[0].user == 'alice'", "true"),
        ("descriptors[0].nope", None),  # no such key: the limit does not apply
        ("descriptors[7].user", None),  # index out of range
    ],
)
def test_fast_variables(source: str, expected: str | None) -> None:
    check_expression(source, expected, fast=True)


def test_fast_path_accepts_any_sequence_of_mappings() -> None:
    predicate = compile_predicate("descriptors[0].k == 'v'")
    assert predicate.test(({"k": "v"},), {"name": None, "id": None})
    assert not predicate.test((), {"name": None, "id": None})


# ---------------------------------------------------------------------------
# Everything else falls back to the CEL library
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("size(descriptors) == 2", True),
        ("has(descriptors[0].model)", True),
        ("has(descriptors[0].nope)", False),
        ("descriptors.exists(d, has(d.tier) && d.tier == 'gold')", True),  # `d` is bound, not a root
        # The library's exists() stops at the first error instead of absorbing
        # it: descriptors[0] has no tier, so this errors, i.e. is false.
        ("descriptors.exists(d, d.tier == 'gold')", False),
        ("descriptors[0].model.contains('4')", True),
        ("descriptors[0].user == 'alice' ? true : false", True),
        ("limit.id == null", True),
        ("descriptors[0].model.matches('^gpt')", True),
        ("descriptors[0]['nope'] == 'x' // comment", False),
        ("descriptors[0]['\\x61'] == 'x'", False),  # hex escape: library only
    ],
)
def test_library_predicates(source: str, expected: bool) -> None:
    check_predicate(source, expected, fast=False)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("size(descriptors)", "2"),
        ("1u", "1"),
        ("-7", "-7"),
        ("1.0", "1"),  # Rust's f64 Display, not Python's repr
        ("1.5", "1.5"),
        ("-0.0", "-0"),
        ("1e21", "1000000000000000000000"),
        ("1e-7", "0.0000001"),
        ("0.1 + 0.2", "0.30000000000000004"),
        ("1.0 / 0.0", "inf"),
        ("null", "null"),
        ("[1, 2]", None),  # lists and maps have no string form
        ("{'a': 1}", None),
        ("b'abc'", None),  # nor do bytes, timestamps and durations in Limitador
        ("timestamp('2024-01-01T00:00:00Z')", None),
        ("9223372036854775807 + 1", None),  # overflow is an evaluation error
        ("descriptors[0].user + '-' + descriptors[1].tier", "alice-gold"),
    ],
)
def test_library_variables_are_stringified_like_limitador(source: str, expected: str | None) -> None:
    check_expression(source, expected, fast=False)


# ---------------------------------------------------------------------------
# Errors: a failed predicate is false, a failed variable is None, and CEL's
# && / || absorb an error when the other side decides the result
# ---------------------------------------------------------------------------

ERR = "descriptors[0].nope == 'x'"  # NoSuchKey
STR = "'text'"  # a non-boolean operand is a type error in a logical operator
NULL = "limit.id"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (f"{ERR} || true", "true"),
        (f"true || {ERR}", "true"),
        (f"{ERR} || false", None),
        (f"false || {ERR}", None),
        (f"{ERR} && false", "false"),
        (f"false && {ERR}", "false"),
        (f"{ERR} && true", None),
        (f"true && {ERR}", None),
        (f"{ERR} || {ERR}", None),
        (f"!({ERR})", None),
        (f"{STR} || true", "true"),
        (f"false || {STR}", None),
        (f"{STR} && false", "false"),
        (f"true && {STR}", None),
        (f"!{STR}", None),
        (f"!{NULL}", None),
        (f"!!{STR}", "text"),  # an even run of `!` is dropped by the parser
        (f"!(!{STR})", None),  # ... but not when parenthesized
        (f"{NULL} || true", "true"),
        # an error operand makes a comparison, membership or affix test an error
        ("descriptors[0].nope == descriptors[0].user", None),
        ("descriptors[0].user != descriptors[0].nope", None),
        ("descriptors[0].nope in ['x']", None),
        ("descriptors[0].nope.startsWith('x')", None),
        ("descriptors[0].user.endsWith(descriptors[0].nope)", None),
        # but mixed types just compare unequal
        (f"{NULL} == 'x'", "false"),
        (f"{NULL} != 'x'", "true"),
        ("true == 'true'", "false"),
        # while affix tests need strings on both sides
        (f"{NULL}.startsWith('x')", None),
        ("'abc'.startsWith(true)", None),
        ("(1 == 1).endsWith('e')", None),
    ],
)
def test_error_absorption(source: str, expected: str | None) -> None:
    for compiled in (compile_expression(source), _library_expression(source)):
        assert compiled.evaluate(DESCRIPTORS, LIMIT) == expected, compiled


@pytest.mark.parametrize("source", [f"{ERR} || false", f"!({ERR})", f"{STR} && true", "descriptors[9].k == 'v'"])
def test_a_predicate_that_errors_is_false(source: str) -> None:
    assert compile_predicate(source).test(DESCRIPTORS, LIMIT) is False
    assert _library_predicate(source).test(DESCRIPTORS, LIMIT) is False


def test_a_non_boolean_library_predicate_is_false() -> None:
    assert compile_predicate("size(descriptors)").test(DESCRIPTORS, LIMIT) is False


# ---------------------------------------------------------------------------
# Compile-time validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "hint"),
    [
        ("req.method == 'POST'", "use descriptors[0]['req.method'] == 'POST'"),
        ('req.method != "GET"', "use descriptors[0]['req.method'] != \"GET\""),
        ("model == 'gpt'", "use descriptors[0]['model'] == 'gpt'"),
        ("auth.identity.user_id", "use descriptors[0]['auth.identity.user_id']"),
    ],
)
def test_limitador_1x_expressions_are_rejected_with_the_2x_form(source: str, hint: str) -> None:
    with pytest.raises(CelError) as raised:
        compile_predicate(source) if "=" in source else compile_expression(source)
    assert raised.value.expression == source
    assert "unknown root identifier" in raised.value.reason
    assert hint in str(raised.value)


@pytest.mark.parametrize(
    ("source", "unknown"),
    [
        ("foo > 3", "'foo'"),
        ("descriptors[0].k == 'v' && request.path == '/'", "'request'"),
        # Two-variable macros are not in the library; `k` is taken for a bound name.
        ("descriptors.all(k, v, true)", "'v'"),
    ],
)
def test_unknown_roots_are_rejected(source: str, unknown: str) -> None:
    with pytest.raises(CelError, match=f"unknown root identifier {unknown};") as raised:
        compile_predicate(source)
    assert "Limitador 1.x" not in raised.value.reason


@pytest.mark.parametrize(
    ("source", "position"),
    [
        ("descriptors[0]['k' == 'v'", "1:26"),
        ("descriptors[0].k = 'v'", "1:18"),
        ("descriptors[0].k == 'v' &&", "1:27"),
        ("'unterminated", "1:1"),
        ("", "1:1"),
    ],
)
def test_syntax_errors_name_the_expression_and_position(source: str, position: str) -> None:
    for compile_ in (compile_predicate, compile_expression):
        with pytest.raises(CelError) as raised:
            compile_(source)
        assert raised.value.expression == source
        assert raised.value.reason.startswith("syntax error")
        assert position in raised.value.reason
        assert repr(source) in str(raised.value)


@pytest.mark.parametrize(
    "source", ["descriptors[0].k", "limit.name", "'yes'", "(descriptors[0]['k'])", "!!descriptors[0].k"]
)
def test_plain_value_conditions_are_rejected(source: str) -> None:
    # They could never be true; Limitador would silently never match.
    with pytest.raises(CelError, match="must be a boolean"):
        compile_predicate(source)
    assert compile_expression(source).is_fast  # ... though they are fine variables


def test_compiled_objects_are_identified_by_source() -> None:
    assert compile_predicate("true") == compile_predicate("true")
    assert len({compile_expression("limit.name"), compile_expression("limit.name")}) == 1
    assert compile_predicate("true") != compile_expression("true")
    assert isinstance(compile_predicate("true"), Predicate)
    assert isinstance(compile_expression("true"), Expression)


# ---------------------------------------------------------------------------
# Property: the fast path agrees with the library on the whole fast grammar
# ---------------------------------------------------------------------------

KEYS = ["a", "b", "c"]
VALUES = ["x", "y", "xy", ""]


def quoted(text: str) -> st.SearchStrategy[str]:
    single = "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    double = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return st.sampled_from([single, double])


literals = st.sampled_from([*VALUES, "x'y", 'q"', "t\tb\\"]).flatmap(quoted)
descriptor_entries = st.builds(
    lambda index, key, spelling: spelling.format(i=index, k=key),
    st.integers(0, 2),
    st.sampled_from(KEYS),
    st.sampled_from(["descriptors[{i}]['{k}']", 'descriptors[{i}]["{k}"]', "descriptors[{i}].{k}"]),
)
values = st.one_of(descriptor_entries, st.sampled_from(["limit.name", "limit.id"]), literals)
leaves = st.one_of(values, st.sampled_from(["true", "false"]))
OPERATORS = ["==", "!=", "&&", "||", "!", "in", "startsWith", "endsWith"]


@st.composite
def fast_sources(draw: st.DrawFn, depth: int = 4, operator_at_top: bool = False) -> str:
    """Random text of the fast grammar (any operand types, so also type errors)."""
    if depth == 0 or (not operator_at_top and draw(st.booleans())):
        return draw(leaves)

    def operand() -> str:
        # Unparenthesized sub-expressions re-associate under CEL precedence;
        # both paths parse the same text, which exercises the fast parser's
        # precedence rules too.
        text = draw(fast_sources(depth - 1))
        return f"({text})" if draw(st.booleans()) else text

    form = draw(st.sampled_from(OPERATORS))
    if form == "!":
        text = operand()
        # `!!x` is `x`: keep a predicate's top level an operator.
        return f"!({text})" if operator_at_top and text.startswith("!") else f"!{text}"
    if form == "in":
        return f"{operand()} in [{', '.join(draw(st.lists(literals, max_size=3)))}]"
    if form in ("startsWith", "endsWith"):
        # A compound receiver needs parentheses (`x in ['a'].startsWith(...)`
        # would call startsWith on the list, which the fast path leaves alone).
        receiver = draw(values) if draw(st.booleans()) else f"({draw(fast_sources(depth - 1))})"
        return f"{receiver}.{form}({operand()})"
    return f"{operand()} {form} {operand()}"


# A predicate starts with an operator: a bare value is rejected at compile time.
predicates = fast_sources(operator_at_top=True)
expressions = fast_sources()

descriptor_lists = st.lists(
    st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=3), max_size=3
)
limits = st.fixed_dictionaries(
    {"name": st.sampled_from([None, *VALUES]), "id": st.sampled_from([None, *VALUES])}
)


@settings(max_examples=400, deadline=None)
@given(source=predicates, descriptors=descriptor_lists, limit=limits)
def test_fast_predicates_agree_with_the_library(
    source: str, descriptors: list[dict[str, str]], limit: dict[str, str | None]
) -> None:
    fast = compile_predicate(source)
    assert fast.is_fast
    assert fast.test(descriptors, limit) is _library_predicate(source).test(descriptors, limit)


@settings(max_examples=400, deadline=None)
@given(source=expressions, descriptors=descriptor_lists, limit=limits)
def test_fast_expressions_agree_with_the_library(
    source: str, descriptors: list[dict[str, str]], limit: dict[str, str | None]
) -> None:
    # Stringified bools keep error apart from false, so this checks the
    # three-valued logic itself, not just its final projection to a bool.
    fast = compile_expression(source)
    assert fast.is_fast
    assert fast.evaluate(descriptors, limit) == _library_expression(source).evaluate(descriptors, limit)
