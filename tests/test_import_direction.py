"""Imports point one way: core <- sources <- servers, and ratelimit <- exporter.

Read from the source with `ast`, so lazy imports inside functions count as much as top-level ones
(a lazy import hides a cycle, it does not remove it). Each rule names the offending file and line.

- the core (limits, cel, counters, engine, storage) imports nothing from server, sources, the
  metrics layer, exporter, dashboards or prometheus_client: it must run embedded, without them;
- sources (limits files, MaaS translation) import nothing from server, exporter or dashboards;
- ratelimit imports nothing from exporter or dashboards (the service finds the exporter's collectors
  by entry point: ratelimit.server.app.METRICS_EXTENSIONS);
- no two modules of the project import each other, directly or round a longer loop.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ratelimit", "exporter", "dashboards")

CORE = ("ratelimit.limits", "ratelimit.cel", "ratelimit.counters", "ratelimit.engine", "ratelimit.storage", "ratelimit.pacing")
CORE_MAY_NOT_IMPORT = (
    "ratelimit.server", "ratelimit.sources", "ratelimit.metrics", "ratelimit.cli", "ratelimit.demo",
    "exporter", "dashboards", "prometheus_client",
)
SOURCES = ("ratelimit.sources",)
SOURCES_MAY_NOT_IMPORT = ("ratelimit.server", "ratelimit.cli", "exporter", "dashboards")
RATELIMIT_MAY_NOT_IMPORT = ("exporter", "dashboards")
KNOWN_LOOPS = {("dashboards.draw", "dashboards.render")}
"""Loops still to be untied (sorted pairs), each with its owner told: `dashboards.render` imports
`draw` lazily (matplotlib is an optional extra) and `draw` uses render's panel helpers; moving those
helpers to a module of their own unties it."""


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    path: Path
    line: int
    type_only: bool

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.importer} imports {self.imported}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    type_only_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                type_only_lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import module` imports that module; `from module import name` the module.
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            targets = submodules or [base]
        for target in targets:
            yield Import(name, target, path, node.lineno, node.lineno in type_only_lines)


def all_imports() -> list[Import]:
    modules = project_modules()
    return [found for name, path in modules.items() for found in imports_of(name, path, modules)]


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def violations(imports: list[Import]) -> list[str]:
    found = []
    for edge in imports:
        if _within(edge.importer, CORE) and _within(edge.imported, CORE_MAY_NOT_IMPORT):
            found.append(f"{edge}: the core must not depend on it")
        elif _within(edge.importer, SOURCES) and _within(edge.imported, SOURCES_MAY_NOT_IMPORT):
            found.append(f"{edge}: sources must not depend on the servers or the exporter")
        elif _within(edge.importer, ("ratelimit",)) and _within(edge.imported, RATELIMIT_MAY_NOT_IMPORT):
            found.append(f"{edge}: exporter and dashboards use ratelimit, never the reverse")
    return found


def cycles(imports: list[Import]) -> list[list[str]]:
    """Import loops among the project's modules (imports for type checking alone do not count)."""
    modules = set(project_modules())
    graph: dict[str, set[str]] = {}
    for edge in imports:
        if not edge.type_only and edge.imported in modules and edge.imported != edge.importer:
            graph.setdefault(edge.importer, set()).add(edge.imported)
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == 1:
                found.append([*path[path.index(imported):], imported])
            elif imported not in state:
                visit(imported)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return [loop for loop in found if tuple(sorted(set(loop))) not in KNOWN_LOOPS]


def test_imports_point_one_way() -> None:
    assert violations(all_imports()) == []


def test_no_module_imports_itself_round_a_loop() -> None:
    assert [" -> ".join(loop) for loop in cycles(all_imports())] == []


# -- the rules catch each reverse import this project once had -------------------------------------

def _edge(importer: str, imported: str) -> Import:
    return Import(importer, imported, ROOT / "x.py", 1, False)


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("ratelimit.storage.redis", "prometheus_client.core"),
        ("ratelimit.sources.limits_file", "ratelimit.server.state"),
        ("ratelimit.sources.maas", "exporter.catalog"),
        ("ratelimit.cli", "exporter.catalog"),
        ("ratelimit.engine", "ratelimit.metrics"),
        ("ratelimit.server.app", "exporter.service"),
    ],
)
def test_a_reverse_import_is_reported(importer: str, imported: str) -> None:
    assert len(violations([_edge(importer, imported)])) == 1


def test_the_service_finds_the_exporter_by_entry_point_and_refuses_a_missing_one() -> None:
    from exporter import extensions
    from ratelimit.server.app import metrics_extension
    from ratelimit.server.errors import ServerError

    assert metrics_extension("quota_metrics", "--quota-metrics") is extensions.quota_metrics
    assert metrics_extension("model_catalog", "--model-catalog") is extensions.model_catalog
    with pytest.raises(ServerError, match="--no-such-metrics needs the ratelimit.metrics_extensions entry point"):
        metrics_extension("no_such_metrics", "--no-such-metrics")


def test_a_loop_between_two_servers_is_reported() -> None:
    loop = [_edge("ratelimit.server.grpc", "ratelimit.server.app"), _edge("ratelimit.server.app", "ratelimit.server.grpc")]
    assert cycles(loop) == [["ratelimit.server.app", "ratelimit.server.grpc", "ratelimit.server.app"]]


def test_submodule_lazy_and_relative_imports_are_read(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text(
        "from ratelimit.storage import base\n"
        "def later():\n"
        "    from ..server import app\n"
        "    import prometheus_client\n",
        encoding="utf-8",
    )
    found = {edge.imported for edge in imports_of("ratelimit.storage.example", source, project_modules())}
    assert found == {"ratelimit.storage.base", "ratelimit.server.app", "prometheus_client"}
