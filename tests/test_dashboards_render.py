"""dashboards.render on a real Prometheus scraping the real service under a token workload: every
panel of every generated dashboard becomes a PNG, and the overview holds one drawn tile per panel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from dashboards.generate import DASHBOARDS
from dashboards.perses import all_queries, with_all_values
from dashboards.render import tiles
from tests.conftest import REPO, wait_until
from tests.prometheus_fixtures import observed, start_prometheus  # noqa: F401 - fixtures

MIN_PNG_BYTES = 5_000  # a blank 800x400 PNG is ~2 KB; any plotted panel is well above


def test_every_panel_renders_to_png(observed, tmp_path: Path) -> None:  # noqa: F811 - a fixture
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
            boxes = json.loads(overview.text["panels"])
            assert sorted(boxes) == sorted(spec["panels"]) and len(tiles(spec)[0]) == len(spec["panels"])
            for key, box in boxes.items():
                tile = overview.convert("L").crop(tuple(box))
                low, high = tile.getextrema()
                assert high - low > 64, f"{name}: tile {key} is blank"
