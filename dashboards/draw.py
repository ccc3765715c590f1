"""Drawing for `dashboards.render`, with matplotlib (the optional extra `render`): each panel into
an Axes, one PNG per panel and the overview. Imported only once matplotlib is known to be there."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, whatever MPLBACKEND says

import matplotlib.dates as mdates  # after the backend is chosen
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Wedge
from matplotlib.ticker import FuncFormatter

from dashboards.perses import GRID_WIDTH, Spec
from dashboards.render import PanelData, format_value, legend, table_rows, tiles

UNIT_INCHES = 0.6, 0.32
"""One grid column, one grid row of the overview."""
TITLE_INCHES = 0.45
TILE_PADDING = 0.65, 0.15, 0.3, 0.35
"""Inches around each overview tile: left (y tick labels), right, top (title), bottom (time ticks)."""
PANEL_INCHES = 8.0, 4.0
DPI = 100


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
