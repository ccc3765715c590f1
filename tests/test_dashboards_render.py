"""dashboards.render on a real Prometheus scraping the real service under a token workload: every
panel of every generated dashboard becomes a PNG, and the overview holds one drawn tile per panel.
Mistakes an operator makes (URL, dashboard name, no matplotlib) get one line, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import cast

from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from dashboards.generate import DASHBOARDS
from dashboards.perses import all_queries, with_all_values
from dashboards.render import tiles
from ratelimit.tools.processes import free_ports
from tests.prometheus_fixtures import LimitadorEmitter
from tests.support import REPO, wait_until

MIN_PNG_BYTES = 5_000  # a blank 800x400 PNG is ~2 KB; any plotted panel is well above


def test_every_panel_renders_to_png(observed, tmp_path: Path) -> None:
    prometheus, _ = observed
    specs = {build().name: build().spec() for build in DASHBOARDS}
    wait_until(lambda: all(prometheus.query(with_all_values(q, spec["variables"]))
                           for spec in specs.values() for q in all_queries(spec)),
               timeout=60, interval=1.0, what="data for every dashboard query")

    for name, spec in specs.items():
        out = tmp_path / name
        # The command line, as an operator runs it (the dashboard by name; Agg needs no display).
        subprocess.run([sys.executable, "-m", "dashboards.render", "--prometheus", prometheus.url,
                        "--dashboard", name, "--out", str(out), "--range", "5m"], cwd=REPO, check=True, timeout=120)

        for key in (*spec["panels"], "overview"):
            png = out / f"{key}.png"
            assert png.stat().st_size > MIN_PNG_BYTES, png
            with Image.open(png) as image:
                assert image.format == "PNG"
                image.verify()

        with Image.open(out / "overview.png") as overview:
            assert isinstance(overview, PngImageFile)
            boxes = json.loads(overview.text["panels"])
            assert sorted(boxes) == sorted(spec["panels"]) and len(tiles(spec)[0]) == len(spec["panels"])
            for key, box in boxes.items():
                tile = overview.convert("L").crop(tuple(box))
                low, high = cast(tuple[int, int], tile.getextrema())  # one band ("L"): one (min, max)
                assert high - low > 64, f"{name}: tile {key} is blank"


def run_render(*args: str, block_matplotlib: bool = False) -> subprocess.CompletedProcess[str]:
    """`python -m dashboards.render ARGS` as an operator runs it; `block_matplotlib` runs it as on an
    install without the `render` extra (matplotlib cannot be imported)."""
    if block_matplotlib:
        command = [sys.executable, "-c", "import runpy, sys; sys.modules['matplotlib'] = None; "
                   "sys.argv[0] = 'dashboards.render'; runpy.run_module('dashboards.render', run_name='__main__')"]
    else:
        command = [sys.executable, "-m", "dashboards.render"]
    return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """A friendly error: exit 2, no traceback, one line on stderr, nothing on stdout."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and not result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m dashboards.render: error: "), result.stderr
    return lines[0]


def test_render_errors_are_one_friendly_line(tmp_path: Path) -> None:
    refused = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    out = str(tmp_path / "out")
    cases = {
        ("--prometheus", refused, "--dashboard", "llm-d-external-models"): f"cannot reach Prometheus at {refused}",
        ("--prometheus", "127.0.0.1:9090", "--dashboard", "llm-d-external-models"): "is not a URL like http://",
        ("--prometheus", refused, "--dashboard", "no-such-dashboard"): "unknown dashboard 'no-such-dashboard': not one of llm-d-external-models",
    }
    for args, expected in cases.items():
        assert expected in one_line_error(run_render(*args, "--out", out)), args
    not_a_dashboard = tmp_path / "limits.yaml"
    not_a_dashboard.write_text("- namespace: ns\n  max_value: 1\n  seconds: 1\n")
    assert "is not a Perses dashboard" in one_line_error(
        run_render("--prometheus", refused, "--dashboard", str(not_a_dashboard), "--out", out))
    missing = one_line_error(run_render("--prometheus", refused, "--dashboard", "llm-d-external-models", "--out", out,
                                        block_matplotlib=True))
    assert "needs matplotlib" in missing and "ratelimit[render]" in missing
    assert not (tmp_path / "out").exists(), "nothing written on an error"


def test_render_names_a_target_that_is_not_prometheus(tmp_path: Path) -> None:
    """A real HTTP server that is not Prometheus (Limitador's /metrics text at every path)."""
    with LimitadorEmitter() as limitador:
        error = one_line_error(run_render("--prometheus", f"http://{limitador.address}", "--dashboard",
                                          "MaaS External Models", "--out", str(tmp_path)))
    assert "did not answer as Prometheus' HTTP API does" in error
