"""CEL conditions and variables for rate limits, with Limitador 2.x semantics.

Every limit has ``conditions`` (CEL predicates; the limit applies when all are
true) and ``variables`` (CEL expressions whose stringified values qualify the
counter).  Expressions see exactly two roots:

* ``descriptors``: a list of string -> string maps, one per Envoy RLS descriptor;
* ``limit``: the map ``{"name": str | None, "id": str | None}``.

Evaluation never raises: a predicate whose evaluation fails (missing key, index
out of range, type error) is false, and a variable that cannot be resolved is
``None`` (the limit then does not apply).

Two evaluation strategies produce the same answers:

* The *fast path*: almost every real condition is a handful of descriptor
  look-ups compared with string literals.  A small recursive-descent parser
  turns that subset of CEL into plain Python closures, so a request costs a few
  dict look-ups and no context building or call into the CEL library.
* The *library path*: everything else goes through the ``cel`` package
  (compiled once, executed per request with a freshly built context).

The library is also the single authority on validity: every source is compiled
by it, whichever path then evaluates it, so the fast parser only has to decide
"can I evaluate this myself?", never "is this valid CEL?".
"""

from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

import cel as cel_library

__all__ = [
    "CelError",
    "Expression",
    "MapExpression",
    "Predicate",
    "compile_expression",
    "compile_map_expression",
    "compile_predicate",
]

Descriptors = Sequence[Mapping[str, str]]
LimitInfo = Mapping[str, "str | None"]


class _Error:
    """A CEL evaluation error carried as a value.

    CEL's ``&&``/``||`` absorb errors (``error || true`` is true), so an error
    cannot simply be an exception: it has to flow into the logical operators
    like any other operand.  Both paths' evaluators return this sentinel.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "<CEL error>"


_ERROR: Final = _Error()

# (descriptors, limit) -> a CEL value (str, bool, None, ...) or _ERROR.
_Evaluator = Callable[[Descriptors, LimitInfo], object]


class CelError(ValueError):
    """An expression rejected at compile time (when the limits are loaded).

    Raised, rather than compiling something that can never match, for syntax
    errors, for root identifiers other than ``descriptors``/``limit`` and for
    conditions that are plain values.  Limitador 2 silently never matches a
    Limitador 1.x condition such as ``req.method == 'POST'``, which is exactly
    the mistake worth failing loudly on.  The message names the expression and
    the reason.
    """

    expression: str
    reason: str

    def __init__(self, expression: str, reason: str) -> None:
        super().__init__(f"invalid CEL expression {expression!r}: {reason}")
        self.expression = expression
        self.reason = reason


class _Compiled:
    """What conditions and variables share: the source and a compiled evaluator."""

    __slots__ = ("source", "is_fast", "_evaluate")

    source: str
    is_fast: bool  # True when evaluated by the fast path, not the CEL library

    def __init__(self, source: str, evaluate: _Evaluator, is_fast: bool) -> None:
        self.source = source
        self.is_fast = is_fast
        self._evaluate = evaluate

    # Limitador identifies conditions and variables by their source text.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Compiled) and type(other) is type(self) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, is_fast={self.is_fast})"

    def __reduce__(self) -> tuple[Callable[[str], _Compiled], tuple[str]]:
        # The evaluator is a closure and does not pickle: a process that receives one (a reload
        # parsed in a child process) compiles the source again, from the compile cache when it can.
        return _COMPILERS[type(self).__name__], (self.source,)


class Predicate(_Compiled):
    """A compiled condition: built once per limit, tested once per request."""

    __slots__ = ()

    def test(self, descriptors: Descriptors, limit: LimitInfo) -> bool:
        """True only for a CEL ``true``: errors and non-booleans are false, as in Limitador."""
        return self._evaluate(descriptors, limit) is True


class Expression(_Compiled):
    """A compiled variable, whose stringified value qualifies a counter."""

    __slots__ = ()

    def evaluate(self, descriptors: Descriptors, limit: LimitInfo) -> str | None:
        """The value as Limitador stringifies it, or None when it cannot be resolved."""
        return _stringify(self._evaluate(descriptors, limit))


class MapExpression(_Compiled):
    """A compiled expression that yields a map (Limitador's `--metric-labels-default`)."""

    __slots__ = ()

    def evaluate_map(self, descriptors: Descriptors, limit: LimitInfo) -> dict[str, str]:
        """The map's string keys with string values, as Limitador's ``Expression::eval_map``: other
        entries are left out, and anything but a map (or an error) is an empty map."""
        value = self._evaluate(descriptors, limit)
        if not isinstance(value, Mapping):
            return {}
        return {key: item for key, item in value.items() if isinstance(key, str) and isinstance(item, str)}


def compile_predicate(source: str) -> Predicate:
    """Compile a condition; raises CelError when it is invalid.

    A fast-path condition that is a bare value (``descriptors[0].k``,
    ``limit.name``, a string literal) can never be true, so it is rejected here
    instead of silently never matching.  Library-path conditions are not type
    checked (the library has no checker); a non-boolean result is false.
    """
    evaluate, node = _compile(source, fast=True)
    if node is not None and not node.is_bool:
        raise CelError(source, "a condition must be a boolean, but this is a plain value "
                               "(compare it, e.g. `... == 'value'`)")
    return Predicate(source, evaluate, is_fast=node is not None)


def compile_expression(source: str) -> Expression:
    """Compile a variable; raises CelError when it is invalid."""
    evaluate, node = _compile(source, fast=True)
    return Expression(source, evaluate, is_fast=node is not None)


def compile_map_expression(source: str) -> MapExpression:
    """Compile a map-valued expression (library path: the fast path only yields strings and
    booleans); raises CelError when it is invalid."""
    evaluate, _ = _compile(source, fast=False)
    return MapExpression(source, evaluate, is_fast=False)


_COMPILERS: Final[dict[str, Callable[[str], _Compiled]]] = {
    "Predicate": compile_predicate, "Expression": compile_expression, "MapExpression": compile_map_expression,
}


def _library_predicate(source: str) -> Predicate:
    """The condition evaluated by the CEL library only (the reference for tests)."""
    evaluate, _ = _compile(source, fast=False)
    return Predicate(source, evaluate, is_fast=False)


def _library_expression(source: str) -> Expression:
    """The variable evaluated by the CEL library only (the reference for tests)."""
    evaluate, _ = _compile(source, fast=False)
    return Expression(source, evaluate, is_fast=False)


COMPILE_CACHE_SIZE = 16384
"""Distinct CEL texts kept compiled. A reload mostly repeats the texts of the limits it replaces,
so their evaluators are reused instead of compiled again (compiling takes ~0.2-0.4 ms a text:
seconds for a few thousand limits)."""


@functools.lru_cache(maxsize=COMPILE_CACHE_SIZE)
def _compile(source: str, *, fast: bool) -> tuple[_Evaluator, _Node | None]:
    """Validate with the library, then prefer the fast path when it covers the source. Evaluators
    are pure functions of (descriptors, limit), so one compiled text serves every limit that uses it;
    a text that does not compile raises, and is not cached."""
    program = _validated_program(source)
    node = _fast_node(source) if fast else None
    if node is not None:
        return node.fn, node
    return _library_evaluator(program), None


# --------------------------------------------------------------------------
# Stringification of variable values
# --------------------------------------------------------------------------


def _stringify(value: object) -> str | None:
    """Mirror Limitador's ``Expression::eval``.

    Int, uint, double, string, bool and null have a string form; every other
    value (list, map, bytes, timestamp, duration, optional) is an error there,
    hence None here -- as is an evaluation error.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "true" if value else "false"
    if isinstance(value, int):  # the library returns both CEL int and uint as int
        return str(value)
    if isinstance(value, float):
        return _rust_float(value)
    if value is None:
        return "null"
    return None


def _rust_float(value: float) -> str:
    """Format like Rust's ``f64`` Display, which Limitador uses.

    Rust prints the shortest round-trip digits (as Python's repr does) but never
    in exponent form and without a trailing ``.0``: 1.0 -> "1", 1e21 ->
    "1000000000000000000000", -0.0 -> "-0".
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = format(Decimal(repr(value)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


# --------------------------------------------------------------------------
# Library path: validation and evaluation
# --------------------------------------------------------------------------

_ROOTS: Final = frozenset({"descriptors", "limit"})

# Program.variables() also lists the names bound by comprehension macros (the
# `d` in `descriptors.exists(d, d.k == 'v')`); those are not roots.  The
# library supports exactly these one-variable macros, all in method form.
_MACRO_BINDING: Final = re.compile(
    r"\.\s*(?:all|exists|exists_one|existsOne|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,"
)


def _validated_program(source: str) -> cel_library.Program:
    try:
        program = cel_library.compile(source)
    except ValueError as exc:
        raise CelError(source, _parse_failure_reason(source, exc)) from None
    bound = set(_MACRO_BINDING.findall(source))
    unknown = sorted(set(program.variables()) - _ROOTS - bound)
    if unknown:
        raise CelError(source, _unknown_root_reason(source, unknown))
    return program


def _parse_failure_reason(source: str, exc: ValueError) -> str:
    # The library's message repeats the source; CelError already names it.
    message = str(exc)
    prefix = f"Failed to parse expression '{source}': "
    return "syntax error: " + (message[len(prefix):] if message.startswith(prefix) else message)


def _unknown_root_reason(source: str, unknown: list[str]) -> str:
    names = ", ".join(repr(name) for name in unknown)
    reason = f"unknown root identifier {names}; only 'descriptors' and 'limit' are defined"
    hint = _limitador_v1_hint(source)
    if hint is not None:
        reason += f"; this looks like a Limitador 1.x expression, use {hint}"
    return reason


def _limitador_v1_hint(source: str) -> str | None:
    """The 2.x spelling of a 1.x ``path.to.key`` or ``path.to.key == 'literal'``.

    In 1.x a dotted name was a descriptor key; in 2.x it is a look-up in a
    descriptor map (Envoy's first descriptor, in the common single-descriptor
    case).
    """
    try:
        tokens = _tokenize(source)
    except _Unsupported:
        return None
    parts: list[str] = []
    i = 0
    while True:  # IDENT ('.' IDENT)*
        if tokens[i].kind != "ident":
            return None
        parts.append(tokens[i].text)
        i += 1
        if tokens[i].text != "." or tokens[i].kind != "op":
            break
        i += 1
    entry = f"descriptors[0][{'.'.join(parts)!r}]"
    rest = tokens[i:]
    if rest[0].kind == "end":
        return entry
    if (len(rest) == 3 and rest[0].kind == "op" and rest[0].text in ("==", "!=")
            and rest[1].kind == "str" and rest[2].kind == "end"):
        return f"{entry} {rest[0].text} {rest[1].text}"
    return None


def _library_evaluator(program: cel_library.Program) -> _Evaluator:
    execute = program.execute

    def evaluate(descriptors: Descriptors, limit: LimitInfo) -> object:
        try:
            return execute({"descriptors": list(descriptors), "limit": dict(limit)})
        except Exception:  # any CEL runtime error: no such key, index, overload, overflow
            return _ERROR

    return evaluate


# --------------------------------------------------------------------------
# Fast path: tokenizer
# --------------------------------------------------------------------------


class _Unsupported(Exception):
    """The source is outside the fast-path subset; the library evaluates it."""


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "ident", "int", "str", "op" or "end"
    text: str  # the source text (a string literal's includes its quotes)
    value: object  # int for "int", decoded text for "str", else the text
    pos: int


def _text_of(token: _Token) -> str:
    """A "str" token's decoded text."""
    if not isinstance(token.value, str):
        raise _Unsupported
    return token.value


def _int_of(token: _Token) -> int:
    """An "int" token's value."""
    if not isinstance(token.value, int):
        raise _Unsupported
    return token.value


_WHITESPACE: Final = " \t\n\r\f"
_DIGITS: Final = "0123456789"
_IDENT_START: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT_CHARS: Final = _IDENT_START | frozenset(_DIGITS)
_OPERATORS: Final = ("==", "!=", "&&", "||", "!", "(", ")", "[", "]", ",", ".")  # longest first
# The simple escapes; \x, \u, \U and octal escapes are left to the library.
_ESCAPES: Final = {
    "\\": "\\", "'": "'", '"': '"', "`": "`", "?": "?",
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
}


def _tokenize(source: str) -> list[_Token]:
    """Split the fast-path subset into tokens, ending with an "end" token.

    Raises _Unsupported on anything else (comments, numbers other than plain
    decimal indices, raw/bytes/triple-quoted strings, other operators...).
    """
    tokens: list[_Token] = []
    i, n = 0, len(source)
    while True:
        while i < n and source[i] in _WHITESPACE:
            i += 1
        if i == n:
            tokens.append(_Token("end", "", None, i))
            return tokens
        start, char = i, source[i]
        value: object
        if char in "'\"":
            kind = "str"
            value, i = _scan_string(source, i)
        elif char in _IDENT_START:
            kind = "ident"
            while i < n and source[i] in _IDENT_CHARS:
                i += 1
            value = source[start:i]
        elif char in _DIGITS:
            kind = "int"
            while i < n and source[i] in _DIGITS:
                i += 1
            # Only canonical decimals: 01, 0x1, 1u and 1.5 mean other things in CEL.
            leading_zero = source[start] == "0" and i - start > 1
            if leading_zero or (i < n and (source[i] in _IDENT_CHARS or source[i] == ".")):
                raise _Unsupported
            value = int(source[start:i])
        else:
            kind = "op"
            value = next((op for op in _OPERATORS if source.startswith(op, i)), None)
            if value is None:
                raise _Unsupported
            i += len(value)
        tokens.append(_Token(kind, source[start:i], value, start))


def _scan_string(source: str, start: int) -> tuple[str, int]:
    """Decode the quoted literal at ``start``; return it and the index after it."""
    quote = source[start]
    if source.startswith(quote * 3, start):
        raise _Unsupported  # triple-quoted (multi-line) string
    chars: list[str] = []
    i = start + 1
    while i < len(source):
        char = source[i]
        if char == quote:
            return "".join(chars), i + 1
        if char in "\r\n":
            raise _Unsupported  # invalid in a single-line literal; the library reports it
        if char == "\\":
            escaped = _ESCAPES.get(source[i + 1:i + 2])
            if escaped is None:
                raise _Unsupported
            chars.append(escaped)
            i += 2
        else:
            chars.append(char)
            i += 1
    raise _Unsupported  # unterminated


# --------------------------------------------------------------------------
# Fast path: closures
#
# Each builder turns sub-nodes into a closure over (descriptors, limit) that
# returns a value -- str, bool, None (null) -- or _ERROR, mirroring CEL's
# evaluation rules exactly.  Literal operands are bound at compile time.
# --------------------------------------------------------------------------

_NOT_LITERAL: Final = object()


@dataclass(frozen=True, slots=True)
class _Node:
    fn: _Evaluator
    is_bool: bool  # an operator (yields a bool or an error), not a plain value
    literal: object = _NOT_LITERAL  # the constant, for literal nodes


def _literal(value: str | bool) -> _Node:
    return _Node(lambda descriptors, limit: value, isinstance(value, bool), value)


def _descriptor_entry(index: int, key: str) -> _Node:
    def entry(descriptors: Descriptors, limit: LimitInfo) -> object:
        try:
            return descriptors[index].get(key, _ERROR)  # CEL: no such key
        except IndexError:
            return _ERROR
    return _Node(entry, is_bool=False)


def _limit_field(field: str) -> _Node:
    # The value may be None: CEL null, which compares unequal to any string.
    return _Node(lambda descriptors, limit: limit.get(field, _ERROR), is_bool=False)


def _negation(operand: _Node) -> _Node:
    get = operand.fn

    def negation(descriptors: Descriptors, limit: LimitInfo) -> object:
        value = get(descriptors, limit)
        if value is True:
            return False
        if value is False:
            return True
        return _ERROR  # !error, !'string', !null
    return _Node(negation, is_bool=True)


def _either(left: _Node, right: _Node) -> _Node:
    """CEL ``||``: true if either side is true, even when the other is an error."""
    return _absorbing(left, right, True)


def _both(left: _Node, right: _Node) -> _Node:
    """CEL ``&&``: false if either side is false, even when the other is an error."""
    return _absorbing(left, right, False)


def _absorbing(left: _Node, right: _Node, absorbing: bool) -> _Node:
    """CEL's commutative ``||`` (absorbing: true) and ``&&`` (absorbing: false): either side's
    absorbing value decides, even when the other side is an error; two of the other boolean give
    that boolean; anything else (an error, a non-bool that nothing absorbed) is an error."""
    get_left, get_right = left.fn, right.fn
    other = not absorbing

    def junction(descriptors: Descriptors, limit: LimitInfo) -> object:
        a = get_left(descriptors, limit)
        if a is absorbing:
            return absorbing
        b = get_right(descriptors, limit)
        if b is absorbing:
            return absorbing
        if a is other and b is other:
            return other
        return _ERROR
    return _Node(junction, is_bool=True)


def _comparison(left: _Node, right: _Node, compare: Callable[[object, object], bool]) -> _Node:
    """CEL ``==`` / ``!=``: an error operand is an error, mixed types are simply unequal.

    Fast-path values are only str, bool and None, whose Python equality is
    CEL's (``null == 'x'`` is false, not an error).
    """
    if left.literal is not _NOT_LITERAL:  # equality is symmetric; a literal never errors
        left, right = right, left
    get_left = left.fn
    if right.literal is not _NOT_LITERAL:
        constant = right.literal

        def against_literal(descriptors: Descriptors, limit: LimitInfo) -> object:
            a = get_left(descriptors, limit)
            return _ERROR if a is _ERROR else compare(a, constant)
        return _Node(against_literal, is_bool=True)

    get_right = right.fn

    def comparison(descriptors: Descriptors, limit: LimitInfo) -> object:
        a = get_left(descriptors, limit)
        if a is _ERROR:
            return _ERROR
        b = get_right(descriptors, limit)
        return _ERROR if b is _ERROR else compare(a, b)
    return _Node(comparison, is_bool=True)


def _membership(operand: _Node, choices: Sequence[str]) -> _Node:
    """CEL ``x in ['a', 'b']`` over string literals: a bool or null is simply not in it."""
    get = operand.fn
    members = frozenset(choices)

    def membership(descriptors: Descriptors, limit: LimitInfo) -> object:
        value = get(descriptors, limit)
        return _ERROR if value is _ERROR else value in members
    return _Node(membership, is_bool=True)


def _affix_test(receiver: _Node, argument: _Node, method: Callable[[str, str], bool]) -> _Node:
    """CEL ``startsWith``/``endsWith``: both sides must be strings, else an error."""
    get_receiver = receiver.fn
    if isinstance(argument.literal, str):
        affix = argument.literal

        def with_literal(descriptors: Descriptors, limit: LimitInfo) -> object:
            value = get_receiver(descriptors, limit)
            return method(value, affix) if isinstance(value, str) else _ERROR
        return _Node(with_literal, is_bool=True)

    get_argument = argument.fn

    def affix_test(descriptors: Descriptors, limit: LimitInfo) -> object:
        value = get_receiver(descriptors, limit)
        affix = get_argument(descriptors, limit)
        if isinstance(value, str) and isinstance(affix, str):
            return method(value, affix)
        return _ERROR
    return _Node(affix_test, is_bool=True)


_AFFIX_METHODS: Final[Mapping[str, Callable[[str, str], bool]]] = {
    "startsWith": str.startswith,
    "endsWith": str.endswith,
}

# CEL reserved words cannot be field names (`descriptors[0].in` is a syntax
# error); the library accepts some of them, so leave them all to it.
_RESERVED: Final = frozenset({
    "as", "break", "const", "continue", "else", "false", "for", "function", "if",
    "import", "in", "let", "loop", "namespace", "null", "package", "return",
    "true", "var", "void", "while",
})


# --------------------------------------------------------------------------
# Fast path: parser
# --------------------------------------------------------------------------


def _fast_node(source: str) -> _Node | None:
    try:
        return _Parser(source).parse()
    except _Unsupported:
        return None


class _Parser:
    """Recursive descent over the fast-path subset, with CEL's precedence::

        or       := and ('||' and)*
        and      := relation ('&&' relation)*
        relation := unary (('==' | '!=') unary | 'in' strings)*
        unary    := '!'* member
        member   := primary ('.' ('startsWith' | 'endsWith') '(' or ')')*
        primary  := STRING | 'true' | 'false' | '(' or ')'
                  | 'descriptors' '[' INT ']' ('[' STRING ']' | '.' IDENT)
                  | 'limit' '.' ('name' | 'id')
        strings  := '[' (STRING (',' STRING)*)? ']'

    Anything else raises _Unsupported.  Since every source was already
    compiled by the library, that is never a user-facing error.
    """

    def __init__(self, source: str) -> None:
        self._tokens = _tokenize(source)
        self._pos = 0

    def parse(self) -> _Node:
        node = self._or()
        self._expect_kind("end")
        return node

    # -- grammar -----------------------------------------------------------

    def _or(self) -> _Node:
        node = self._and()
        while self._accept("||"):
            node = _either(node, self._and())
        return node

    def _and(self) -> _Node:
        node = self._relation()
        while self._accept("&&"):
            node = _both(node, self._relation())
        return node

    def _relation(self) -> _Node:
        # CEL's relations share one precedence level, left-associative:
        # `a == b in ['x']` is `(a == b) in ['x']`.
        node = self._unary()
        while True:
            if self._accept("=="):
                node = _comparison(node, self._unary(), operator.eq)
            elif self._accept("!="):
                node = _comparison(node, self._unary(), operator.ne)
            elif self._accept("in"):
                node = _membership(node, self._string_list())
            else:
                return node

    def _unary(self) -> _Node:
        # As in cel-go, the parser drops an even run of `!` outright, so
        # `!!x` is `x` itself, even a string (`!(!x)` is a type error).
        negations = 0
        while self._accept("!"):
            negations += 1
        node = self._member()
        return _negation(node) if negations % 2 else node

    def _member(self) -> _Node:
        node = self._primary()
        while self._accept("."):
            method = _AFFIX_METHODS.get(self._expect_kind("ident").text)
            if method is None:
                raise _Unsupported
            self._expect("(")
            argument = self._or()
            self._expect(")")
            node = _affix_test(node, argument, method)
        return node

    def _primary(self) -> _Node:
        token = self._next()
        if token.kind == "str":
            return _literal(_text_of(token))
        if token.kind == "op" and token.text == "(":
            node = self._or()
            self._expect(")")
            return node
        if token.kind == "ident":
            if token.text in ("true", "false"):
                return _literal(token.text == "true")
            if token.text == "descriptors":
                return self._descriptor_entry()
            if token.text == "limit":
                self._expect(".")
                field = self._expect_kind("ident").text
                if field in ("name", "id"):
                    return _limit_field(field)
        raise _Unsupported

    def _descriptor_entry(self) -> _Node:
        self._expect("[")
        index = _int_of(self._expect_kind("int"))
        self._expect("]")
        if self._accept("["):
            key = _text_of(self._expect_kind("str"))
            self._expect("]")
        else:
            self._expect(".")
            key = self._expect_kind("ident").text
            if key in _RESERVED:
                raise _Unsupported
        return _descriptor_entry(index, key)

    def _string_list(self) -> list[str]:
        self._expect("[")
        items: list[str] = []
        if not self._accept("]"):
            items.append(_text_of(self._expect_kind("str")))
            while self._accept(","):
                items.append(_text_of(self._expect_kind("str")))
            self._expect("]")
        return items

    # -- token helpers -----------------------------------------------------

    def _next(self) -> _Token:
        token = self._tokens[self._pos]
        if token.kind != "end":
            self._pos += 1
        return token

    def _accept(self, text: str) -> bool:
        """Consume the operator or keyword ``text`` if it comes next."""
        token = self._tokens[self._pos]
        if token.kind in ("op", "ident") and token.text == text:
            self._pos += 1
            return True
        return False

    def _expect(self, text: str) -> None:
        if not self._accept(text):
            raise _Unsupported

    def _expect_kind(self, kind: str) -> _Token:
        token = self._next()
        if token.kind != kind:
            raise _Unsupported
        return token
