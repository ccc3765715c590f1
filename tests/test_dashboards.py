"""The generated dashboards: up to date, valid by Perses' own schemas (npm @perses-dev/core, run
with node) and by the plugins' closed CUE schemas' keys, PromQL parsed by promtool, and the alert
rules' own promtool tests."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.generate import DASHBOARDS, OUT, files, render
from dashboards.perses import Dashboard, all_queries
from tests.prometheus_fixtures import all_values
from tests.support import REPO

DASHBOARD_DIR = OUT.parent
PANEL_KEY = re.compile(r"^[a-zA-Z0-9_.-]{1,75}$")
# Keys the plugins' closed CUE schemas accept (perses/plugins */schemas/*.cue), for what we use.
PLUGIN_KEYS = {
    "TimeSeriesChart": {"legend", "tooltip", "yAxis", "thresholds", "visual", "querySettings"},
    "StatChart": {"calculation", "format", "thresholds", "sparkline", "colorMode", "mappings", "metricLabel"},
    "GaugeChart": {"calculation", "format", "thresholds", "max", "legend"},
    "Table": {"density", "pagination", "columnSettings", "cellSettings", "transforms", "enableFiltering",
              "enableSorting", "defaultColumnWidth", "defaultColumnHeight"},
}
REQUIRED_PLUGIN_KEYS = {"StatChart": {"calculation"}, "GaugeChart": {"calculation"}}
QUERY_KEYS = {"query", "seriesNameFormat", "minStep", "resolution", "instant", "datasource"}
PERSES_VALIDATOR = REPO / "tests" / "perses"


def generated() -> dict[str, dict]:
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted(OUT.glob("*.yaml"))}


def grafana_files() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(OUT.glob("*.grafana.json"))}


def dashboard_specs() -> list[tuple[str, dict]]:
    """(file, dashboard spec) for both forms: the CR's spec.config and the plain spec."""
    specs = []
    for name, document in generated().items():
        if document.get("kind") == "PersesDashboard":
            assert document["apiVersion"] == "perses.dev/v1alpha2"
            specs.append((name, document["spec"]["config"]))
        elif document.get("kind") == "Dashboard":
            specs.append((name, document["spec"]))
    return specs


def test_generated_files_are_up_to_date() -> None:
    expected = {name: render(name, content) for name, content in files().items()}
    actual = {path.name: path.read_text() for path in OUT.iterdir() if path.suffix in (".yaml", ".json")}
    assert actual == expected, "run `python -m dashboards.generate` and commit dashboards/generated/"


def test_three_dashboards_in_both_forms() -> None:
    kinds = [document.get("kind") for document in generated().values()]
    assert kinds.count("PersesDashboard") == kinds.count("Dashboard") == len(DASHBOARDS) >= 3
    names = {spec["display"]["name"] for _, spec in dashboard_specs()}
    assert {"MaaS External Models", "MaaS GPU-served Models", "Subscriptions & Quota"} <= names


@pytest.mark.parametrize(("name", "spec"), dashboard_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_dashboard_structure(name: str, spec: dict) -> None:
    panels = spec["panels"]
    refs = [item["content"]["$ref"] for layout in spec["layouts"] for item in layout["spec"]["items"]]
    assert sorted(refs) == sorted(f"#/spec/panels/{key}" for key in panels), "every ref resolves, every panel placed"
    for layout in spec["layouts"]:
        assert layout["kind"] == "Grid"
        for item in layout["spec"]["items"]:
            assert item["x"] + item["width"] <= 24
    variable_names = [variable["spec"]["name"] for variable in spec.get("variables", [])]
    assert len(variable_names) == len(set(variable_names)) and not any(n.startswith("__") for n in variable_names)
    for variable in spec.get("variables", []):
        assert variable["spec"]["plugin"]["spec"]["labelName"]
    for key, panel in panels.items():
        assert PANEL_KEY.match(key), key
        assert panel["kind"] == "Panel"
        plugin = panel["spec"]["plugin"]
        assert set(plugin["spec"]) <= PLUGIN_KEYS[plugin["kind"]], key
        assert REQUIRED_PLUGIN_KEYS.get(plugin["kind"], set()) <= set(plugin["spec"]), key
        assert panel["spec"]["queries"], key
        for query in panel["spec"]["queries"]:
            assert query["kind"] == "TimeSeriesQuery"
            assert query["spec"]["plugin"]["kind"] == "PrometheusTimeSeriesQuery"
            assert set(query["spec"]["plugin"]["spec"]) <= QUERY_KEYS, key
            assert query["spec"]["plugin"]["spec"]["query"].strip()
    # Every variable a query uses is defined (Perses leaves an unknown `$x` in the PromQL).
    used = {m for q in all_queries(spec) for m in re.findall(r"\$(\w+)", q)}
    assert used <= set(variable_names), name


def test_every_counter_query_accepts_total_names() -> None:
    """A bare Limitador counter name in a dashboard would miss `_total` series (an OTel pipeline)."""
    bare = re.compile(r"(?<![\w:\"])(authorized_calls|authorized_hits|limited_calls)(?![\w(])")
    for name, spec in dashboard_specs():
        for query in all_queries(spec):
            assert not bare.search(query), (name, query)


def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    """Prometheus's own parser, offline: each query as a recording rule for `promtool check rules`."""
    queries = sorted({all_values(q) for _, spec in dashboard_specs() for q in all_queries(spec)})
    rules = {"groups": [{"name": "dashboards", "rules": [{"record": f"dashboard:query{i}", "expr": q}
                                                         for i, q in enumerate(queries)]}]}
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump(rules))
    result = subprocess.run(["promtool", "check", "rules", str(tmp_path / "queries.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_check_and_unit_tests() -> None:
    check = subprocess.run(["promtool", "check", "rules", str(OUT / "rules.yaml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(["promtool", "test", "rules", "rules_test.yaml"], cwd=DASHBOARD_DIR / "tests",
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr


def test_prometheus_rule_carries_the_tested_rules() -> None:
    documents = generated()
    assert documents["prometheusrule.yaml"]["spec"]["groups"] == documents["rules.yaml"]["groups"]
    monitor = documents["servicemonitor.yaml"]
    assert monitor["kind"] == "ServiceMonitor" and {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}


def perses_problems(documents: dict[str, dict], work_dir: Path) -> dict[str, list[str]]:
    """Each document's problems by tests/perses/validate.cjs: Perses' own zod schemas and
    vocabularies from @perses-dev/core (installed by ./scripts/test with npm ci)."""
    if shutil.which("node") is None:
        pytest.fail("node is not installed: ./scripts/test installs it (apt-get install nodejs npm)")
    if not (PERSES_VALIDATOR / "node_modules" / "@perses-dev" / "core" / "package.json").is_file():
        pytest.fail("@perses-dev/core is not installed in tests/perses: ./scripts/test installs it "
                    "(or: cd tests/perses && npm ci)")
    paths = {}
    for name, document in documents.items():
        paths[name] = work_dir / f"{name}.json"
        paths[name].write_text(json.dumps(document))
    result = subprocess.run(["node", str(PERSES_VALIDATOR / "validate.cjs"), *map(str, paths.values())],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode in (0, 1) and result.stdout, result.stderr
    report = json.loads(result.stdout)
    return {name: report[str(path)] for name, path in paths.items()}


def test_dashboards_pass_perses_own_validation(tmp_path: Path) -> None:
    documents = {name: document for name, document in generated().items()
                 if document.get("kind") in ("Dashboard", "PersesDashboard")}
    assert len(documents) == 2 * len(DASHBOARDS)
    assert perses_problems(documents, tmp_path) == {name: [] for name in documents}


def _fault(path: str, value: Any = None, delete: bool = False) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A change to a plain dashboard at a dotted `path` (list indices as numbers)."""
    def apply(document: dict[str, Any]) -> dict[str, Any]:
        document = copy.deepcopy(document)
        *parents, last = path.split(".")
        node: Any = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) else last
        if delete:
            del node[key]
        else:
            node[key] = value
        return document
    return apply


# (fault, the place its problem must name): the validator must be able to fail.
FAULTS = {
    "legend position": (_fault("spec.panels.authorizedCalls.spec.plugin.spec.legend.position", "top"),
                        "authorizedCalls.spec.plugin.spec.legend.position"),
    "unit": (_fault("spec.panels.ratio429.spec.plugin.spec.yAxis.format.unit", "percentage"), "yAxis.format.unit"),
    "calculation missing": (_fault("spec.panels.refusedNow.spec.plugin.spec.calculation", delete=True),
                            "refusedNow.spec.plugin.spec.calculation"),
    "panel title missing": (_fault("spec.panels.topUsers.spec.display.name", ""), "topUsers.spec.display.name"),
    "panel kind": (_fault("spec.panels.topUsers.kind", "Pannel"), "topUsers.kind"),
    "panel field": (_fault("spec.panels.topUsers.spec.legendFormat", "{{user}}"), "topUsers.spec.legendFormat"),
    "dangling ref": (_fault("spec.layouts.0.spec.items.0.content", {"$ref": "#/spec/panels/nope"}),
                     "layouts.0.spec.items.0.content"),
    "panel key": (lambda d: {**d, "spec": {**d["spec"], "panels": {("bad key" if k == "topUsers" else k): v
                                                                   for k, v in d["spec"]["panels"].items()}}},
                  "panels.bad key"),
    "duration": (_fault("spec.duration", "1 hour"), "spec.duration"),
    "variable field": (_fault("spec.variables.0.spec.label", "Route"), "variables.0.spec.label"),
    "variable flag": (_fault("spec.variables.0.spec.allowMultiple", "yes"), "variables.0.spec.allowMultiple"),
    "project": (_fault("metadata.project", delete=True), "metadata.project"),
}


def test_perses_validation_catches_faults(tmp_path: Path) -> None:
    plain = generated()["llm-d-external-models.dashboard.yaml"]
    documents = {name: fault(plain) for name, (fault, _) in FAULTS.items()}
    problems = perses_problems(documents, tmp_path)
    for name, (_, where) in FAULTS.items():
        assert any(where in problem for problem in problems[name]), (name, problems[name])


GRAFANA_PANEL_TYPES = {"timeseries", "stat", "gauge", "table"}


@pytest.mark.parametrize("build", DASHBOARDS, ids=lambda build: build.__name__)
def test_grafana_dashboard_says_what_the_perses_one_says(build: Callable[[], Dashboard]) -> None:
    """Each generated Grafana JSON: a data source variable every target uses, every Perses variable,
    panels on the 24-column grid without overlaps, and per panel (by title) the same PromQL, in the
    same order, as the Perses panel."""
    dashboard = build()
    grafana = grafana_files()[f"{dashboard.name}.grafana.json"]
    assert grafana["title"] == dashboard.title and grafana["uid"]
    variables = {v["name"]: v for v in grafana["templating"]["list"]}
    assert variables.pop("datasource")["type"] == "datasource"
    assert set(variables) == {v["spec"]["name"] for v in dashboard.variables}
    for variable in variables.values():
        assert variable["includeAll"] and variable["allValue"] == ".*" and variable["datasource"]["uid"] == "${datasource}"
        assert re.fullmatch(r"label_values\(\{.+\}, \w+\)|label_values\(\w+(\{.*\})?, \w+\)", variable["definition"])
    panels = [p for p in grafana["panels"] if p["type"] != "row"]
    rows = [p for p in grafana["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == [row.title for row in dashboard.rows]
    cells: set[tuple[int, int]] = set()
    for panel in grafana["panels"]:
        place = panel["gridPos"]
        assert place["x"] + place["w"] <= 24 and place["w"] > 0 and place["h"] > 0
        covered = {(x, y) for x in range(place["x"], place["x"] + place["w"]) for y in range(place["y"], place["y"] + place["h"])}
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
    perses = {p["spec"]["display"]["name"]: p for p in dashboard.spec()["panels"].values()}
    titles = [p["title"] for p in panels]
    assert sorted(titles) == sorted(perses) and len(set(titles)) == len(titles)
    for panel in panels:
        assert panel["type"] in GRAFANA_PANEL_TYPES and panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == "${datasource}"
            assert set(re.findall(r"\$(\w+)", target["expr"])) <= set(variables), target["expr"]
        expected = [q["spec"]["plugin"]["spec"]["query"] for q in perses[panel["title"]]["spec"]["queries"]]
        assert [t["expr"] for t in panel["targets"]] == expected, panel["title"]
        legends = [q["spec"]["plugin"]["spec"].get("seriesNameFormat") for q in perses[panel["title"]]["spec"]["queries"]]
        if panel["type"] == "timeseries":
            assert [t["legendFormat"] for t in panel["targets"]] == [legend or "__auto" for legend in legends]


def test_grafana_table_names_and_formats_its_columns() -> None:
    grafana = grafana_files()["ratelimit-subscriptions-quota.grafana.json"]
    table = next(p for p in grafana["panels"] if p["title"] == "Users Closest to Exhaustion")
    assert [t["format"] for t in table["targets"]] == ["table"] * 4 and all(t["instant"] for t in table["targets"])
    assert [t["id"] for t in table["transformations"]] == ["merge", "organize"]
    assert table["transformations"][1]["options"]["excludeByName"] == {"Time": True}
    names = {o["matcher"]["options"]: {p["id"]: p["value"] for p in o["properties"]}
             for o in table["fieldConfig"]["overrides"]}
    assert names["limitador_namespace"]["displayName"] == "Route" and names["counter"]["displayName"] == "User"
    assert names["Value #A"] == {"displayName": "Used", "unit": "percentunit", "description": "used / limit"}
    assert names["Value #D"]["unit"] == "s"
