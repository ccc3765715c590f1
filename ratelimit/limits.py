"""The Limit model and Limitador limits-file loading.

A limits file is a YAML list of limits, exactly as Limitador reads it::

    - namespace: maas-demo/qwen3-14b
      name: premium
      max_value: 30000
      seconds: 300
      conditions: ["descriptors[0]['tier'] == 'premium'"]
      variables: ["descriptors[0]['user']"]

Errors name the file, the line, the limit's index and the field, because an operator fixing a
hot-reloaded ConfigMap has nothing else to go on.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar, cast

import yaml

from ratelimit.cel import CelError, Expression, Predicate, compile_expression, compile_predicate

# Counters are int64 in memory and in Redis; keep sums of max_value and deltas far from overflow.
MAX_LIMIT_VALUE = 2**53
# One window may last at most ten years: longer is surely a unit mistake.
MAX_WINDOW_SECONDS = 10 * 365 * 86400

C = TypeVar("C", Predicate, Expression)

KNOWN_FIELDS = ("namespace", "max_value", "seconds", "name", "id", "conditions", "variables")

# libyaml's parser when PyYAML was built with it (Debian's and the PyPI wheels are): ~10x faster than
# the pure-Python one, which takes seconds for thousands of limits. Same nodes, same line marks.
YAML_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class InvalidLimit(ValueError):
    """A limit breaking a rule of its own; names the field (`conditions[1]` for an item) and why."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


Identity = tuple[str, int, tuple[str, ...], tuple[str, ...]]


@dataclass(frozen=True, eq=False)
class Limit:
    """A quota of `max_value` per fixed window of `seconds`, for the requests its conditions select.

    Conditions and variables are kept sorted and de-duplicated (Limitador keeps them in ordered
    sets), so two spellings of the same limit have the same identity. Limits compare and hash by
    `identity` (namespace, seconds, conditions, variables): a reload that changes only max_value or
    name is the same limit and keeps its counters. The hash is computed once, at construction.

    A Limit checks its own fields and compiles its CEL once, here: InvalidLimit names the field
    (`conditions[i]` counts in the order given).
    """

    namespace: str
    max_value: int
    seconds: int
    conditions: tuple[str, ...] = ()
    variables: tuple[str, ...] = ()
    name: str | None = None
    id: str | None = None
    identity: Identity = field(init=False, repr=False)
    predicates: tuple[Predicate, ...] = field(init=False, repr=False)
    expressions: tuple[Expression, ...] = field(init=False, repr=False)
    identity_digest: bytes = field(init=False, repr=False)
    """128 bits of the identity, the same in every process (the memory table's shared registry keys
    limits by it); made here, so a reload's limits are hashed while they are rebuilt, in slices."""
    _hash: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not self.namespace:
            raise InvalidLimit("namespace", "must not be empty")
        _check_whole("max_value", self.max_value, 0, MAX_LIMIT_VALUE)
        _check_whole("seconds", self.seconds, 1, MAX_WINDOW_SECONDS)
        predicates = _compiled("conditions", self.conditions, compile_predicate)
        expressions = _compiled("variables", self.variables, compile_expression)
        conditions = tuple(sorted(predicates))
        variables = tuple(sorted(expressions))
        identity = (self.namespace, self.seconds, conditions, variables)
        set_field = object.__setattr__  # frozen: fields are set once, here
        set_field(self, "conditions", conditions)
        set_field(self, "variables", variables)
        set_field(self, "predicates", tuple(predicates[c] for c in conditions))
        set_field(self, "expressions", tuple(expressions[v] for v in variables))
        set_field(self, "identity", identity)
        set_field(self, "identity_digest", hashlib.blake2b(repr(identity).encode("utf-8"), digest_size=16).digest())
        set_field(self, "_hash", hash(identity))

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Limit):
            return NotImplemented
        return self._hash == other._hash and self.identity == other.identity

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[Limit], tuple[Any, ...]]:
        # Compiled CEL does not pickle: a Limit sent to another process is rebuilt (and recompiled) there.
        return (Limit, (self.namespace, self.max_value, self.seconds, self.conditions, self.variables, self.name, self.id))

    @cached_property
    def cel_binding(self) -> dict[str, str | None]:
        """The CEL `limit` root: `{name, id}`."""
        return {"name": self.name, "id": self.id}

    def to_dict(self) -> dict[str, Any]:
        """Limitador's JSON shape for a limit (HTTP `/limits`, `/counters`)."""
        return {
            "id": self.id,
            "namespace": self.namespace,
            "max_value": self.max_value,
            "seconds": self.seconds,
            "name": self.name,
            "conditions": list(self.conditions),
            "variables": list(self.variables),
        }


def unique_limits(limits: Iterable[Limit]) -> list[Limit]:
    """The first limit of each identity, in order: Limitador's limits are a set keyed by identity.
    (By identity_digest, whose hash Python keeps: a reload of thousands runs on the event loop.)"""
    first: dict[bytes, Limit] = {}
    for limit in limits:
        first.setdefault(limit.identity_digest, limit)
    return list(first.values())


def _check_whole(field_name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidLimit(field_name, f"must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise InvalidLimit(field_name, f"must be between {low} and {high}, got {value}")


def _compiled(field_name: str, sources: Iterable[str], compile_: Callable[[str], C]) -> dict[str, C]:
    """Each distinct CEL text compiled once, by text; errors name the item in the order given."""
    compiled: dict[str, C] = {}
    for i, text in enumerate(sources):
        if not isinstance(text, str):
            raise InvalidLimit(f"{field_name}[{i}]", f"must be a CEL string, got {text!r}")
        if text not in compiled:
            try:
                compiled[text] = compile_(text)
            except CelError as exc:
                raise InvalidLimit(f"{field_name}[{i}]", str(exc)) from None
    return compiled


@dataclass
class LimitsError(ValueError):
    """A limits file (or document) that cannot be loaded; says where and why."""

    source: str
    message: str
    line: int | None = None
    index: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        parts = [where]
        if self.index is not None:
            parts.append(f"limit #{self.index}")
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        return ": ".join(parts) + f": {self.message}"


@dataclass
class _LimitBuilder:
    """Reads one YAML mapping node into a Limit, raising LimitsError with the node's line."""

    source: str
    index: int
    node: yaml.Node
    constructor: yaml.constructor.SafeConstructor
    values: dict[str, tuple[Any, yaml.Node]] = field(default_factory=dict)

    def error(self, message: str, node: yaml.Node | None = None, field_name: str | None = None) -> LimitsError:
        line = (node or self.node).start_mark.line + 1
        return LimitsError(self.source, message, line=line, index=self.index, field=field_name)

    def build(self) -> Limit:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected a mapping with {', '.join(KNOWN_FIELDS[:3])}, ..., got {_describe(self.node)}")
        for key_node, value_node in self.node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key not in KNOWN_FIELDS:
                raise self.error(f"unknown field; known fields are {', '.join(KNOWN_FIELDS)}", key_node, str(key))
            if key in self.values:
                raise self.error("given twice", key_node, key)
            self.values[key] = (_construct(self.constructor, value_node), value_node)

        try:
            return Limit(
                namespace=self._string("namespace", required=True),
                max_value=self._integer("max_value"),
                seconds=self._integer("seconds"),
                conditions=tuple(self._strings("conditions")),
                variables=tuple(self._strings("variables")),
                name=self._string("name"),
                id=self._string("id"),
            )
        except InvalidLimit as exc:
            raise self.error(exc.message, self._node_of(exc.field), exc.field) from None

    def _node_of(self, field_name: str) -> yaml.Node | None:
        """The node an InvalidLimit's field names: `conditions[2]` is the third item of the list."""
        name, _, item = field_name.partition("[")
        if name not in self.values:
            return None
        node = self.values[name][1]
        if item and isinstance(node, yaml.SequenceNode):
            return cast(yaml.Node, node.value[int(item.rstrip("]"))])
        return node

    def _string(self, name: str, required: bool = False) -> Any:
        if name not in self.values:
            if required:
                raise self.error("is required", field_name=name)
            return None
        value, node = self.values[name]
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise self.error(f"must be a string, got {_describe(node)}", node, name)
        return value

    def _integer(self, name: str) -> int:
        """A whole number (its range is the Limit's rule)."""
        if name not in self.values:
            raise self.error("is required", field_name=name)
        value, node = self.values[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"must be a whole number, got {_describe(node)}", node, name)
        return value

    def _strings(self, name: str) -> list[str]:
        """conditions / variables: a list of CEL strings; absent or null means none (as in Limitador's examples)."""
        if name not in self.values:
            return []
        value, node = self.values[name]
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(f"must be a list of CEL strings, got {_describe(node)}", node, name)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"must be a CEL string, got {_describe(node.value[i])}", node.value[i], f"{name}[{i}]")
        return value


def _construct(constructor: yaml.constructor.SafeConstructor, node: yaml.Node) -> Any:
    """The plain Python value of a YAML node (the node itself is kept for its line number)."""
    try:
        return constructor.construct_object(node, deep=True)
    finally:
        # One constructor per document (making one per node costs more than the parse); its memo of
        # constructed nodes must not grow with the document.
        constructor.constructed_objects.clear()
        constructor.recursive_objects.clear()


def _describe(node: yaml.Node | None) -> str:
    if isinstance(node, yaml.ScalarNode):
        return f"{node.value!r}"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    return "nothing"


def parse_limits(text: str, source: str = "<limits>") -> list[Limit]:
    """Parse a Limitador limits document. Limits with the same identity collapse into the first one,
    as in Limitador (its limits are a set keyed by identity)."""
    try:
        root = yaml.compose(text, Loader=YAML_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise LimitsError(source, f"not valid YAML: {getattr(exc, 'problem', None) or exc}", line=line) from None
    if root is None:
        return []
    if not isinstance(root, yaml.SequenceNode):
        raise LimitsError(source, f"expected a list of limits, got {_describe(root)}", line=root.start_mark.line + 1)
    constructor = yaml.constructor.SafeConstructor()
    return unique_limits(
        _LimitBuilder(source, index, node, constructor).build() for index, node in enumerate(root.value)
    )


def load_limits_file(path: str | os.PathLike[str]) -> list[Limit]:
    """Read and parse a limits file; unreadable files are LimitsError too, naming the path."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise LimitsError(source, f"cannot read: {exc}") from None
    return parse_limits(text, source)


def dump_limits(limits: list[Limit]) -> str:
    """Normalized YAML, as `ratelimit validate` prints it (Limitador's `--validate`)."""
    documents = []
    for limit in limits:
        item: dict[str, Any] = {"namespace": limit.namespace}
        if limit.name is not None:
            item["name"] = limit.name
        if limit.id is not None:
            item["id"] = limit.id
        item.update(
            max_value=limit.max_value,
            seconds=limit.seconds,
            conditions=list(limit.conditions),
            variables=list(limit.variables),
        )
        documents.append(item)
    return yaml.safe_dump(documents, sort_keys=False, allow_unicode=True)
