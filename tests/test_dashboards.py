"""The generated dashboards: up to date, structurally valid Perses, PromQL parsed by promtool, and
the alert rules' own promtool tests."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from dashboards.generate import DASHBOARDS, OUT, files, render
from dashboards.perses import all_queries
from tests.test_metrics_prometheus import all_values

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


def generated() -> dict[str, dict]:
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted(OUT.glob("*.yaml"))}


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
    expected = {name: render(content) for name, content in files().items()}
    actual = {path.name: path.read_text() for path in OUT.glob("*.yaml")}
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
