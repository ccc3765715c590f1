"""The same dashboards as Grafana JSON (MaaS ships Grafana dashboards too), built from the Perses
spec so both say the same thing: one Grafana panel per Perses panel with the same PromQL, legends
and units, Perses' grid rows as Grafana row panels (both grids are 24 columns wide), the Perses
variables as query variables with the same "All" (`.*`), and a data source variable.

Import the files under dashboards/generated/*.grafana.json in Grafana (Dashboards > Import), or
wrap them in a GrafanaDashboard resource of the grafana-operator.
"""

from __future__ import annotations

from typing import Any

from dashboards.perses import GRID_WIDTH, Dashboard, Spec

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Perses unit -> Grafana unit, for the units the dashboards use (and a few neighbours).
UNITS = {"percent-decimal": "percentunit", "percent": "percent", "decimal": "none", "seconds": "s",
         "milliseconds": "ms", "bytes": "bytes", "requests/sec": "reqps"}
PANEL_TYPES = {"TimeSeriesChart": "timeseries", "StatChart": "stat", "GaugeChart": "gauge", "Table": "table"}
SCHEMA_VERSION = 39
REF_IDS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def grafana_dashboard(dashboard: Dashboard) -> dict[str, Any]:
    spec = dashboard.spec()
    panels: list[dict[str, Any]] = []
    top = 0
    for layout in spec["layouts"]:
        panels.append({"id": len(panels) + 1, "type": "row", "title": layout["spec"]["display"]["title"],
                       "collapsed": False, "gridPos": {"x": 0, "y": top, "w": GRID_WIDTH, "h": 1}, "panels": []})
        top += 1
        bottom = top
        for item in layout["spec"]["items"]:
            key = item["content"]["$ref"].rsplit("/", 1)[-1]
            place = {"x": item["x"], "y": top + item["y"], "w": item["width"], "h": item["height"]}
            panels.append(_panel(len(panels) + 1, spec["panels"][key], place))
            bottom = max(bottom, place["y"] + place["h"])
        top = bottom
    return {
        "uid": dashboard.name[:40], "title": dashboard.title, "description": dashboard.description,
        "tags": ["ratelimit", "maas"], "editable": True, "schemaVersion": SCHEMA_VERSION,
        "time": {"from": f"now-{dashboard.duration}", "to": "now"}, "refresh": spec["refreshInterval"],
        "timezone": "browser", "graphTooltip": 1,
        "templating": {"list": [_datasource_variable(), *(_variable(v) for v in dashboard.variables)]},
        "panels": panels,
    }


def _panel(panel_id: int, panel: Spec, place: dict[str, int]) -> dict[str, Any]:
    plugin = panel["spec"]["plugin"]
    kind, options = plugin["kind"], plugin["spec"]
    table = kind == "Table"
    targets = []
    for index, q in enumerate(panel["spec"]["queries"]):
        query_spec = q["spec"]["plugin"]["spec"]
        target: dict[str, Any] = {"refId": REF_IDS[index], "datasource": DATASOURCE, "expr": query_spec["query"]}
        if table:  # one row per series, the last value: as Perses' Table does
            target.update(instant=True, range=False, format="table")
        else:
            target.update(range=True, legendFormat=query_spec.get("seriesNameFormat", "__auto"))
        targets.append(target)
    unit = (options.get("format") or options.get("yAxis", {}).get("format") or {}).get("unit")
    defaults: dict[str, Any] = {}
    if unit is not None:
        defaults["unit"] = UNITS[unit]
    result: dict[str, Any] = {
        "id": panel_id, "type": PANEL_TYPES[kind], "title": panel["spec"]["display"]["name"],
        "description": panel["spec"]["display"].get("description", ""), "datasource": DATASOURCE,
        "gridPos": place, "targets": targets, "fieldConfig": {"defaults": defaults, "overrides": []}, "options": {},
    }
    last = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    if kind == "TimeSeriesChart":
        legend = options.get("legend", {})
        result["options"] = {"legend": {"showLegend": bool(legend), "displayMode": legend.get("mode", "list"),
                                        "placement": legend.get("position", "bottom")},
                             "tooltip": {"mode": "multi", "sort": "desc"}}
        visual = options.get("visual", {})
        if visual.get("stack"):
            defaults["custom"] = {"stacking": {"mode": "normal" if visual["stack"] == "all" else "percent"},
                                  "fillOpacity": round(100 * visual.get("areaOpacity", 0.5))}
    elif kind == "StatChart":
        result["options"] = {"reduceOptions": last, "colorMode": "value", "graphMode": "none"}
    elif kind == "GaugeChart":
        defaults.update(min=0, max=options.get("max", 1))
        result["options"] = {"reduceOptions": last, "showThresholdMarkers": True}
    elif kind == "Table":
        _table(result, options)
    return result


def _table(result: dict[str, Any], options: Spec) -> None:
    """Perses merges the queries' series by their labels (MergeSeries) and names the values
    `value` / `value #N`; Grafana merges table frames (`merge`) and names them `Value` /
    `Value #<refId>`. Column headers and units become overrides; hidden columns are excluded."""
    def grafana_name(name: str) -> str:
        if name == "value":
            return "Value"
        if name.startswith("value #"):
            return "Value #" + REF_IDS[int(name.removeprefix("value #")) - 1]
        return "Time" if name == "timestamp" else name

    excluded, overrides = {}, []
    for setting in options.get("columnSettings", []):
        name = grafana_name(setting["name"])
        if setting.get("hide"):
            excluded[name] = True
            continue
        properties: list[dict[str, Any]] = [{"id": "displayName", "value": setting.get("header", setting["name"])}]
        if "format" in setting:
            properties.append({"id": "unit", "value": UNITS[setting["format"]["unit"]]})
        if setting.get("headerDescription"):
            properties.append({"id": "description", "value": setting["headerDescription"]})
        overrides.append({"matcher": {"id": "byName", "options": name}, "properties": properties})
    result["transformations"] = [{"id": "merge", "options": {}},
                                 {"id": "organize", "options": {"excludeByName": excluded}}]
    result["fieldConfig"]["overrides"] = overrides
    result["options"] = {"showHeader": True, "cellHeight": "sm"}


def _datasource_variable() -> dict[str, Any]:
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "hide": 0, "current": {}}


def _variable(variable: Spec) -> dict[str, Any]:
    spec = variable["spec"]
    plugin = spec["plugin"]["spec"]
    # Grafana's label_values takes one selector where Perses takes a union of matchers; the last
    # matcher of ours is the one a plain Limitador's series answer (the catalog's comes first).
    definition = f"label_values({plugin['matchers'][-1]}, {plugin['labelName']})"
    return {"name": spec["name"], "label": spec["display"]["name"], "type": "query", "datasource": DATASOURCE,
            "query": {"query": definition, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "definition": definition, "refresh": 2, "sort": 1, "multi": spec["allowMultiple"],
            "includeAll": spec["allowAllValue"], "allValue": spec.get("customAllValue", ".*"),
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "hide": 0}
