"""A picture of a dashboard without Perses: every panel rendered to PNG from a Prometheus.

    python -m dashboards.render --prometheus http://127.0.0.1:9090 --dashboard llm-d-external-models \\
        --out /tmp/shots [--range 15m]

`--dashboard` is a generated dashboard's name or title, or a file (a PersesDashboard or a plain
Perses Dashboard). Variables are at "All". TimeSeriesChart panels become line plots
(`/api/v1/query_range`), StatChart a big number, GaugeChart a gauge and Table a table
(`/api/v1/query`). Writes `<panel key>.png` per panel and `overview.png`, the dashboard's grid with
one tile per panel; the overview's PNG text chunk `panels` lists each tile's key and pixel box
(left, top, right, bottom). Needs matplotlib, the optional extra `render` (drawing is in
dashboards/draw.py; this module fetches and shapes the data without it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dashboards.generate import DASHBOARDS
from dashboards.perses import Spec, value_column, with_all_values

POINTS = 240
"""Points per series of a range query (the step is the range divided by this)."""
_DURATION = re.compile(r"^(\d+)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Series = list[tuple[dict[str, str], list[tuple[float, float]]]]
"""Query answers: each series' labels and its (unix time, value) points."""


class RenderError(Exception):
    """Something the operator can fix (the URL, the dashboard's name, a missing extra): one line."""


def parse_duration(text: str) -> int:
    """Seconds of a Prometheus-style duration: `30s`, `15m`, `1h`, `2d`."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 15m")
    return int(match[1]) * _SECONDS[match[2]]


def load_dashboard(name_or_file: str) -> Spec:
    """A generated dashboard's spec by name or title, or the spec in a Dashboard / PersesDashboard file."""
    names = []
    for build in DASHBOARDS:
        dashboard = build()
        if name_or_file in (dashboard.name, dashboard.title):
            return dashboard.spec()
        names.append(dashboard.name)
    path = Path(name_or_file)
    if not path.is_file():
        raise RenderError(f"unknown dashboard {name_or_file!r}: not one of {', '.join(names)} (or their titles), "
                          "and no such file")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RenderError(f"cannot read dashboard file {path}: {exc}") from None
    kind = document.get("kind") if isinstance(document, dict) else None
    spec = (document.get("spec") or {}) if isinstance(document, dict) else {}
    if kind == "PersesDashboard":
        spec = spec.get("config") or {}
    if kind not in ("Dashboard", "PersesDashboard") or not isinstance(spec.get("panels"), dict):
        raise RenderError(f"{path} is not a Perses dashboard: a `kind: Dashboard` or `PersesDashboard` with panels")
    return spec


class Prometheus:
    """The two HTTP API calls the renderer needs (stdlib only: the renderer runs outside the tests)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise RenderError(f"--prometheus {url!r} is not a URL like http://127.0.0.1:9090")
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, **params: Any) -> dict[str, Any]:
        address = f"{self.url}{path}"
        try:
            with urllib.request.urlopen(f"{address}?{urllib.parse.urlencode(params)}", timeout=self.timeout) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as exc:
            body = _json_or_none(exc)
            if body is None:
                raise RenderError(f"{address} answered HTTP {exc.code}: is {self.url} Prometheus' base URL?") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RenderError(f"cannot reach Prometheus at {self.url}: {reason}") from None
        except ValueError:  # JSON
            raise RenderError(f"{address} did not answer as Prometheus' HTTP API does (not JSON): "
                              f"is {self.url} Prometheus' base URL?") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else body
            raise RenderError(f"Prometheus refused {params.get('query')!r}: {error}")
        return body["data"]

    def instant(self, promql: str, at: float) -> Series:
        result = self._get("/api/v1/query", query=promql, time=at)["result"]
        return [(r["metric"], [(float(r["value"][0]), float(r["value"][1]))]) for r in result]

    def range(self, promql: str, start: float, end: float) -> Series:
        step = max(1.0, (end - start) / POINTS)
        result = self._get("/api/v1/query_range", query=promql, start=start, end=end, step=step)["result"]
        return [(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in result]


def _json_or_none(error: urllib.error.HTTPError) -> Any:
    """Prometheus answers a bad query with HTTP 400 and its JSON error body; anything else is not it."""
    try:
        return json.load(error)
    except (ValueError, OSError):
        return None


@dataclass
class PanelData:
    """One panel and its queries' answers, one (legend format, series) per query."""

    key: str
    panel: Spec
    answers: list[tuple[str | None, Series]]

    @property
    def kind(self) -> str:
        return str(self.panel["spec"]["plugin"]["kind"])

    @property
    def title(self) -> str:
        return str(self.panel["spec"]["display"]["name"])

    @property
    def unit(self) -> str | None:
        plugin = self.panel["spec"]["plugin"]["spec"]
        return (plugin.get("format") or plugin.get("yAxis", {}).get("format") or {}).get("unit")


def fetch(prometheus: Prometheus, spec: Spec, seconds: int, end: float | None = None) -> list[PanelData]:
    """Every panel's data, in the dashboard's panel order, with its variables at "All"."""
    end = time.time() if end is None else end
    panels = []
    for key, panel in spec["panels"].items():
        ranged = panel["spec"]["plugin"]["kind"] == "TimeSeriesChart"  # the others show the last value
        answers = []
        for q in panel["spec"]["queries"]:
            query_spec = q["spec"]["plugin"]["spec"]
            promql = with_all_values(query_spec["query"], spec.get("variables", []))
            series = prometheus.range(promql, end - seconds, end) if ranged else prometheus.instant(promql, end)
            answers.append((query_spec.get("seriesNameFormat"), series))
        panels.append(PanelData(key, panel, answers))
    return panels


def legend(name_format: str | None, labels: dict[str, str]) -> str:
    """Perses' `seriesNameFormat` (`{{label}}`), or the labels as Prometheus prints them."""
    if name_format is None:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items() if k != "__name__") + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), name_format)


def format_value(value: float, unit: str | None) -> str:
    if math.isnan(value):
        return "NaN"
    if unit == "percent-decimal":
        return f"{value * 100:.1f}%"
    if unit == "seconds":
        return f"{value:.3g} s"
    return f"{value:.4g}"


def table_rows(data: PanelData) -> tuple[list[str], list[list[str]]]:
    """The table as Perses shows it: each query's series merged by their labels into one row
    (MergeSeries), a query's value in column `value` (one query) or `value #N`, then the
    columnSettings' order, headers, formats and hidden columns; other columns after, by name."""
    count = len(data.answers)
    rows: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
    for index, (_, series) in enumerate(data.answers):
        for labels, points in series:
            key = tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))
            rows.setdefault(key, {})[value_column(index, count)] = points[-1][1]
    settings = {s["name"]: s for s in data.panel["spec"]["plugin"]["spec"].get("columnSettings", [])}
    present = {k for key in rows for k, _ in key} | {c for values in rows.values() for c in values}
    names = [n for n in settings if n in present] + sorted(present - set(settings))
    names = [n for n in names if not settings.get(n, {}).get("hide")]
    headers = [settings.get(n, {}).get("header", n) for n in names]
    cells = []
    for key, values in rows.items():
        labels = dict(key)
        row = []
        for name in names:
            if name in values:
                unit = settings.get(name, {}).get("format", {}).get("unit")
                row.append(format_value(values[name], unit))
            else:
                row.append(labels.get(name, ""))
        cells.append(row)
    return headers, cells


@dataclass(frozen=True)
class Tile:
    key: str
    x: int
    y: int
    width: int
    height: int


def tiles(spec: Spec) -> tuple[list[Tile], int]:
    """The panels' places on one grid of GRID_WIDTH columns (the layouts' grids stacked, as Perses
    shows rows), and the grid's total height."""
    placed, top = [], 0
    for layout in spec["layouts"]:
        bottom = top
        for item in layout["spec"]["items"]:
            key = item["content"]["$ref"].rsplit("/", 1)[-1]
            placed.append(Tile(key, item["x"], top + item["y"], item["width"], item["height"]))
            bottom = max(bottom, top + item["y"] + item["height"])
        top = bottom
    return placed, top


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.render", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--dashboard", required=True, help="a generated dashboard's name or title, or a dashboard file")
    parser.add_argument("--out", required=True, type=Path, help="directory for the PNGs")
    parser.add_argument("--range", default="15m", type=parse_duration, help="time range of the charts (default 15m)")
    args = parser.parse_args(argv)
    try:
        draw = _drawing()  # before any query: a missing extra is the first thing to say
        spec = load_dashboard(args.dashboard)
        panels = fetch(Prometheus(args.prometheus), spec, args.range)
        try:
            written = draw.render(spec, panels, args.out)
        except OSError as exc:
            raise RenderError(f"cannot write the pictures to {args.out}: {exc}") from None
    except RenderError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def _drawing() -> Any:
    try:
        from dashboards import draw
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "matplotlib":
            raise
        raise RenderError("drawing needs matplotlib, which is not installed: pip install 'ratelimit[render]' "
                          "(or pip install matplotlib)") from None
    return draw


if __name__ == "__main__":
    sys.exit(main())
