"""Small constructors for the Perses dashboard model (perses/spec, plugins' CUE schemas).

Only the fields the plugins' closed schemas accept are produced; tests/test_dashboards.py checks
the generated files against the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Spec = dict[str, Any]
GRID_WIDTH = 24


def query(promql: str, legend: str | None = None) -> Spec:
    spec: Spec = {"query": promql}
    if legend is not None:
        spec["seriesNameFormat"] = legend
    return {"kind": "TimeSeriesQuery", "spec": {"plugin": {"kind": "PrometheusTimeSeriesQuery", "spec": spec}}}


def _panel(title: str, description: str, plugin: Spec, queries: list[Spec]) -> Spec:
    return {"kind": "Panel", "spec": {"display": {"name": title, "description": description},
                                      "plugin": plugin, "queries": queries}}


def time_series(title: str, description: str, *queries: Spec, stacked: bool = False,
                unit: str | None = None) -> Spec:
    spec: Spec = {"legend": {"mode": "list", "position": "bottom"}}
    if stacked:
        spec["visual"] = {"display": "line", "stack": "all", "areaOpacity": 0.5}
    if unit is not None:
        spec["yAxis"] = {"format": {"unit": unit}}
    return _panel(title, description, {"kind": "TimeSeriesChart", "spec": spec}, list(queries))


def stat(title: str, description: str, q: Spec, unit: str = "decimal") -> Spec:
    # `calculation` is required by the StatChart schema.
    spec = {"calculation": "last-number", "format": {"unit": unit}}
    return _panel(title, description, {"kind": "StatChart", "spec": spec}, [q])


def gauge(title: str, description: str, q: Spec, unit: str = "percent-decimal", maximum: float = 1.0) -> Spec:
    # `calculation` is required by the GaugeChart schema.
    spec = {"calculation": "last-number", "format": {"unit": unit}, "max": maximum}
    return _panel(title, description, {"kind": "GaugeChart", "spec": spec}, [q])


@dataclass(frozen=True)
class Column:
    """A table column by the name Perses gives it: a label, `value` (one query) or `value #N`
    (the Nth query's value, when a table has several)."""

    name: str
    header: str
    description: str = ""
    unit: str | None = None

    def setting(self) -> Spec:
        setting: Spec = {"name": self.name, "header": self.header}
        if self.description:
            setting["headerDescription"] = self.description
        if self.unit is not None:
            setting["format"] = {"unit": self.unit}
        return setting


# The instant-query timestamp Perses adds as a column: the same on every row.
HIDDEN_COLUMNS = ("timestamp",)


def table(title: str, description: str, *queries: Spec, columns: Sequence[Column] = ()) -> Spec:
    """A table whose queries' series are merged by their labels into one row each (MergeSeries),
    with named and formatted columns. The queries should aggregate to the labels the columns name,
    so no scrape label (`instance`, `job`) or unnamed column shows."""
    settings = [column.setting() for column in columns]
    settings += [{"name": name, "hide": True} for name in HIDDEN_COLUMNS]
    spec: Spec = {"density": "compact", "columnSettings": settings, "transforms": [{"kind": "MergeSeries", "spec": {}}]}
    return _panel(title, description, {"kind": "Table", "spec": spec}, list(queries))


def value_column(index: int, count: int) -> str:
    """The column Perses names the value of query `index` (0-based) of `count`."""
    return "value" if count == 1 else f"value #{index + 1}"


def label_variable(name: str, title: str, label: str, *matchers: str) -> Spec:
    """A multi-select label-values variable whose "All" is `.*`, so `label=~"$name"` also matches
    series without the label (a call with no `user`). Several matchers offer the union of their
    series' values (Prometheus' `match[]`)."""
    return {"kind": "ListVariable", "spec": {
        "name": name, "display": {"name": title, "hidden": False},
        "allowAllValue": True, "allowMultiple": True, "customAllValue": ".*", "defaultValue": "$__all",
        "plugin": {"kind": "PrometheusLabelValuesVariable", "spec": {"labelName": label, "matchers": list(matchers)}},
    }}


@dataclass
class Row:
    title: str
    panels: dict[str, Spec]
    width: int = 12
    height: int = 8


@dataclass
class Dashboard:
    name: str
    title: str
    description: str
    rows: list[Row]
    variables: list[Spec] = field(default_factory=list)
    duration: str = "1h"

    def spec(self) -> Spec:
        panels: dict[str, Spec] = {}
        layouts = []
        for row in self.rows:
            items = []
            for index, (key, panel) in enumerate(row.panels.items()):
                per_line = GRID_WIDTH // row.width
                items.append({"x": (index % per_line) * row.width, "y": (index // per_line) * row.height,
                              "width": row.width, "height": row.height,
                              "content": {"$ref": f"#/spec/panels/{key}"}})
                panels[key] = panel
            layouts.append({"kind": "Grid", "spec": {"display": {"title": row.title, "collapse": {"open": True}},
                                                     "items": items}})
        return {"display": {"name": self.title, "description": self.description},
                "variables": self.variables, "panels": panels, "layouts": layouts,
                "duration": self.duration, "refreshInterval": "30s"}

    def custom_resource(self, namespace: str) -> Spec:
        """perses.dev/v1alpha2: the dashboard spec sits under spec.config."""
        return {"apiVersion": "perses.dev/v1alpha2", "kind": "PersesDashboard",
                "metadata": {"name": self.name, "namespace": namespace,
                             "labels": {"app.kubernetes.io/part-of": "ratelimit",
                                        "app.opendatahub.io/dashboard": "true"}},
                "spec": {"config": self.spec()}}

    def plain(self, project: str) -> Spec:
        """The Perses API's own form (`percli apply`, `percli lint`)."""
        return {"kind": "Dashboard", "metadata": {"name": self.name, "project": project}, "spec": self.spec()}


def with_all_values(promql: str, variables: list[Spec]) -> str:
    """A query as Perses sends it with every variable at "All": `$name` / `${name}` become the
    variable's `customAllValue` (`.*` for ours)."""
    for variable in variables:
        name, all_value = variable["spec"]["name"], variable["spec"].get("customAllValue", ".*")
        reference = re.compile(r"\$(\{" + re.escape(name) + r"\}|" + re.escape(name) + r"\b)")
        promql = reference.sub(all_value.replace("\\", "\\\\"), promql)
    return promql


def all_queries(spec: Spec) -> list[str]:
    """Every PromQL expression of a dashboard spec, in panel order."""
    return [q["spec"]["plugin"]["spec"]["query"] for panel in spec["panels"].values() for q in panel["spec"]["queries"]]
