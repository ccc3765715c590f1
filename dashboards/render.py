"""A picture of a dashboard without Perses: every panel rendered to PNG from a Prometheus.

    python -m dashboards.render --prometheus http://127.0.0.1:9090 --dashboard llm-d-external-models \\
        --out /tmp/shots [--range 15m]

`--dashboard` is a generated dashboard's name or title, or a file (a PersesDashboard or a plain
Perses Dashboard). Variables are at "All". TimeSeriesChart panels become line plots
(`/api/v1/query_range`), StatChart a big number, GaugeChart a gauge and Table a table
(`/api/v1/query`). Writes
`<panel key>.png` per panel and `overview.png`, the dashboard's grid with one tile per panel; the
overview's PNG text chunk `panels` lists each tile's key and pixel box (left, top, right, bottom).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, whatever MPLBACKEND says

import matplotlib.dates as mdates  # after the backend is chosen
import matplotlib.pyplot as plt
import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Wedge
from matplotlib.ticker import FuncFormatter

from dashboards.generate import DASHBOARDS
from dashboards.perses import GRID_WIDTH, Spec, value_column, with_all_values

POINTS = 240
"""Points per series of a range query (the step is the range divided by this)."""
UNIT_INCHES = 0.6, 0.32
"""One grid column, one grid row of the overview."""
TITLE_INCHES = 0.45
TILE_PADDING = 0.65, 0.15, 0.3, 0.35
"""Inches around each overview tile: left (y tick labels), right, top (title), bottom (time ticks)."""
PANEL_INCHES = 8.0, 4.0
DPI = 100
_DURATION = re.compile(r"^(\d+)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Series = list[tuple[dict[str, str], list[tuple[float, float]]]]
"""Query answers: each series' labels and its (unix time, value) points."""


def parse_duration(text: str) -> int:
    """Seconds of a Prometheus-style duration: `30s`, `15m`, `1h`, `2d`."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 15m")
    return int(match[1]) * _SECONDS[match[2]]


def load_dashboard(name_or_file: str) -> Spec:
    """A generated dashboard's spec by name or title, or the spec in a Dashboard / PersesDashboard file."""
    for build in DASHBOARDS:
        dashboard = build()
        if name_or_file in (dashboard.name, dashboard.title):
            return dashboard.spec()
    document = yaml.safe_load(Path(name_or_file).read_text(encoding="utf-8"))
    return document["spec"]["config"] if document.get("kind") == "PersesDashboard" else document["spec"]


class Prometheus:
    """The two HTTP API calls the renderer needs (stdlib only: the renderer runs outside the tests)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, **params: Any) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params)}", timeout=self.timeout) as answer:
            body = json.load(answer)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus refused {params.get('query')!r}: {body.get('error')}")
        return body["data"]

    def instant(self, promql: str, at: float) -> Series:
        result = self._get("/api/v1/query", query=promql, time=at)["result"]
        return [(r["metric"], [(float(r["value"][0]), float(r["value"][1]))]) for r in result]

    def range(self, promql: str, start: float, end: float) -> Series:
        step = max(1.0, (end - start) / POINTS)
        result = self._get("/api/v1/query_range", query=promql, start=start, end=end, step=step)["result"]
        return [(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in result]


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


def draw(ax: Axes, data: PanelData, compact: bool = False) -> None:
    """One panel into `ax`: shared by the per-panel PNGs and the overview's tiles."""
    ax.set_title(data.title, fontsize=9 if compact else 12, loc="left")
    if not any(series for _, series in data.answers):
        ax.set_axis_off()
        ax.text(0.5, 0.5, "No data", ha="center", va="center", fontsize=12, color="grey", transform=ax.transAxes)
        return
    if data.kind == "TimeSeriesChart":
        _draw_time_series(ax, data, compact)
    elif data.kind == "StatChart":
        # `last-number` of the first series, as the StatChart's calculation asks.
        _, series = data.answers[0]
        _, points = series[0]
        value = points[-1][1]
        ax.set_axis_off()
        ax.text(0.5, 0.45, format_value(value, data.unit), ha="center", va="center",
                fontsize=28 if compact else 48, fontweight="bold", color="tab:blue", transform=ax.transAxes)
    elif data.kind == "Table":
        _draw_table(ax, data, compact)
    elif data.kind == "GaugeChart":
        _draw_gauge(ax, data, compact)
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"{data.kind}: not rendered", ha="center", va="center", transform=ax.transAxes)


def _draw_time_series(ax: Axes, data: PanelData, compact: bool) -> None:
    for name_format, series in data.answers:
        for labels, points in series:
            times = mdates.date2num([datetime.fromtimestamp(t) for t, _ in points])
            ax.plot(times, [v for _, v in points], label=legend(name_format, labels), linewidth=1.2)
    ax.xaxis_date()
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v, data.unit)))
    ax.tick_params(labelsize=7 if compact else 9)
    ax.xaxis.get_offset_text().set_visible(not compact)  # the date: no room for it under a tile
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6 if compact else 8, loc="upper left", framealpha=0.7)


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


def _draw_table(ax: Axes, data: PanelData, compact: bool) -> None:
    headers, cells = table_rows(data)
    ax.set_axis_off()
    table = ax.table(cellText=cells, colLabels=headers, loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(6 if compact else 8)


def _draw_gauge(ax: Axes, data: PanelData, compact: bool) -> None:
    """A half-disc filled up to the value's share of the panel's `max`, the value written below."""
    _, series = data.answers[0]
    value = series[0][1][-1][1]
    maximum = float(data.panel["spec"]["plugin"]["spec"].get("max", 1.0))
    share = min(max(value / maximum, 0.0), 1.0) if maximum > 0 and not math.isnan(value) else 0.0
    ax.set_axis_off()
    ax.set_aspect("equal")
    ax.add_patch(Wedge((0, 0), 1.0, 0, 180, width=0.3, color="lightgrey"))
    color = "tab:green" if share < 0.75 else "tab:orange" if share < 0.9 else "tab:red"
    ax.add_patch(Wedge((0, 0), 1.0, 180 - 180 * share, 180, width=0.3, color=color))
    ax.text(0, 0.1, format_value(value, data.unit), ha="center", va="bottom", fontsize=16 if compact else 28,
            fontweight="bold")
    ax.set_xlim(-1.1, 1.1)
    ax.set_ylim(-0.1, 1.1)


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


def render(spec: Spec, panels: list[PanelData], out: Path) -> list[Path]:
    """Writes `<key>.png` per panel and `overview.png`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for data in panels:
        figure = plt.figure(figsize=PANEL_INCHES, dpi=DPI)
        draw(figure.add_subplot(), data)
        written.append(_save(figure, out / f"{data.key}.png"))
    written.append(_save_overview(spec, panels, out / "overview.png"))
    return written


def _save_overview(spec: Spec, panels: list[PanelData], path: Path) -> Path:
    by_key = {data.key: data for data in panels}
    placed, height = tiles(spec)
    figure = plt.figure(figsize=(GRID_WIDTH * UNIT_INCHES[0], height * UNIT_INCHES[1]), dpi=DPI)
    width_in, height_in = figure.get_size_inches()
    grid = figure.add_gridspec(height, GRID_WIDTH, left=0.0, right=1.0, top=1 - TITLE_INCHES / height_in, bottom=0.0,
                               hspace=0.0, wspace=0.0)
    figure.suptitle(spec["display"]["name"], x=0.01, ha="left", fontsize=14, fontweight="bold")
    left, right, top, bottom = (edge / size for edge, size in zip(TILE_PADDING, (width_in, width_in, height_in, height_in)))
    boxes = {}
    for tile in placed:
        ax = figure.add_subplot(grid[tile.y:tile.y + tile.height, tile.x:tile.x + tile.width])
        # The grid's cells touch: pad each tile for its title, tick labels and axis labels.
        cell = ax.get_position()
        ax.set_position((cell.x0 + left, cell.y0 + bottom, cell.width - left - right, cell.height - top - bottom))
        draw(ax, by_key[tile.key], compact=True)
        box = ax.get_position()  # figure fractions, origin bottom left
        width, height_px = width_in * DPI, height_in * DPI
        boxes[tile.key] = [round(box.x0 * width), round((1 - box.y1) * height_px),
                           round(box.x1 * width), round((1 - box.y0) * height_px)]
    return _save(figure, path, {"panels": json.dumps(boxes)})


def _save(figure: Figure, path: Path, metadata: dict[str, str] | None = None) -> Path:
    figure.savefig(path, dpi=DPI, metadata={"Software": "dashboards.render", **(metadata or {})})
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dashboards.render", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--dashboard", required=True, help="a generated dashboard's name or title, or a dashboard file")
    parser.add_argument("--out", required=True, type=Path, help="directory for the PNGs")
    parser.add_argument("--range", default="15m", type=parse_duration, help="time range of the charts (default 15m)")
    args = parser.parse_args(argv)
    spec = load_dashboard(args.dashboard)
    for path in render(spec, fetch(Prometheus(args.prometheus), spec, args.range), args.out):
        print(path)


if __name__ == "__main__":
    main()
