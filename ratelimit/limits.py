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

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import yaml

from ratelimit.cel import CelError, Expression, Predicate, compile_expression, compile_predicate

# Counters are int64 in memory and in Redis; keep sums of max_value and deltas far from overflow.
MAX_LIMIT_VALUE = 2**53
# One window may last at most ten years: longer is surely a unit mistake.
MAX_WINDOW_SECONDS = 10 * 365 * 86400

KNOWN_FIELDS = ("namespace", "max_value", "seconds", "name", "id", "conditions", "variables")

# libyaml's parser when PyYAML was built with it (Debian's and the PyPI wheels are): ~10x faster than
# the pure-Python one, which takes seconds for thousands of limits. Same nodes, same line marks.
YAML_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, eq=False)
class Limit:
    """A quota of `max_value` per fixed window of `seconds`, for the requests its conditions select.

    Conditions and variables are kept sorted and de-duplicated (Limitador keeps them in ordered
    sets), so two spellings of the same limit have the same identity. Compare limits by `identity`;
    `==` and hashing are by object, which keeps dictionaries keyed by Limit cheap on the hot path.
    """

    namespace: str
    max_value: int
    seconds: int
    conditions: tuple[str, ...] = ()
    variables: tuple[str, ...] = ()
    name: str | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "conditions", tuple(sorted(set(self.conditions))))
        object.__setattr__(self, "variables", tuple(sorted(set(self.variables))))

    @property
    def identity(self) -> tuple[str, int, tuple[str, ...], tuple[str, ...]]:
        """What makes two limits the same limit: a reload changing only max_value/name keeps counters."""
        return (self.namespace, self.seconds, self.conditions, self.variables)

    @cached_property
    def predicates(self) -> tuple[Predicate, ...]:
        return tuple(compile_predicate(c) for c in self.conditions)

    @cached_property
    def expressions(self) -> tuple[Expression, ...]:
        return tuple(compile_expression(v) for v in self.variables)

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

        namespace = self._string("namespace", required=True)
        if not namespace:
            raise self.error("must not be empty", self.values["namespace"][1], "namespace")
        max_value = self._integer("max_value", 0, MAX_LIMIT_VALUE)
        seconds = self._integer("seconds", 1, MAX_WINDOW_SECONDS)
        conditions = self._strings("conditions")
        variables = self._strings("variables")
        for field_name, sources, compile_ in (
            ("conditions", conditions, compile_predicate),
            ("variables", variables, compile_expression),
        ):
            for i, text in enumerate(sources):
                try:
                    compile_(text)
                except CelError as exc:
                    item_node = self.values[field_name][1].value[i]
                    raise self.error(str(exc), item_node, f"{field_name}[{i}]") from None
        return Limit(
            namespace=namespace,
            max_value=max_value,
            seconds=seconds,
            conditions=tuple(conditions),
            variables=tuple(variables),
            name=self._string("name"),
            id=self._string("id"),
        )

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

    def _integer(self, name: str, low: int, high: int) -> int:
        if name not in self.values:
            raise self.error("is required", field_name=name)
        value, node = self.values[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"must be a whole number, got {_describe(node)}", node, name)
        if not low <= value <= high:
            raise self.error(f"must be between {low} and {high}, got {value}", node, name)
        return value

    def _strings(self, name: str) -> list[str]:
        """conditions / variables: a list of CEL strings; absent or null means none (as in Limitador's examples)."""
        value, node = self.values.get(name, (None, None))
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
    limits: dict[tuple, Limit] = {}
    constructor = yaml.constructor.SafeConstructor()
    for index, node in enumerate(root.value):
        limit = _LimitBuilder(source, index, node, constructor).build()
        limits.setdefault(limit.identity, limit)
    return list(limits.values())


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
